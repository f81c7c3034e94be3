"""`python -m llama_cpp.server` with the model loaded the way pudl loads its own: `python tests/llama_server.py
--model M.gguf --port P ...` (the same arguments). llama.cpp's AMX weight repacking segfaults on VMs that
advertise AMX (see pudl/llamacpp.py), so the server runs with pudl's patch that turns the extra buffers off.
"""

import runpy
import sys

from pudl.llamacpp import _without_extra_buffers

if __name__ == "__main__":
    sys.argv[0] = "llama_cpp.server"
    with _without_extra_buffers():  # held while serving: the model is loaded when the app is created
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
