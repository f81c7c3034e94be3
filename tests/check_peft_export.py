"""Manual check (needs `pip install -e ".[bench]"` for torch, transformers, peft): does real PEFT read
`pudl export --to peft` and compute what pudl's student computes?  python tests/check_peft_export.py RUN_DIR TMP_DIR"""
import subprocess, sys, numpy as np
run, tmp = sys.argv[1], sys.argv[2]
subprocess.run([sys.executable, "-m", "pudl.cli", "export", run, "--to", "peft", "--out", f"{tmp}/peft",
                "--hf-base", f"{tmp}/hf", "--force"], check=True)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained(f"{tmp}/hf")
base = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, f"{tmp}/peft")
msgs = [{"role": "user", "content": "What is the opposite of \"high\"? Reply with just one word."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    peft_lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1).numpy()
    with model.disable_adapter():
        base_lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1).numpy()
import mlx.core as mx
from pudl.adapters import read_gguf_lora
from pudl.models import load_student, resolve_model_path
lora = read_gguf_lora(f"{run}/adapter.gguf")
st = load_student(resolve_model_path("smollm2-135m"), lora.rank, lora.alpha, lora.targets)
st.load_lora_state(lora.state)
h = st.hidden(mx.array(np.asarray(ids)[None, 0].astype(np.int32)))
logits = h[0, -1] @ st.head_weight.T
pudl_lp = np.array(logits - mx.logsumexp(logits))
print("peft vs pudl max |dlogp| (top 50):", float(np.abs(peft_lp - pudl_lp)[np.argsort(-pudl_lp)[:50]].max()),
      "argmax equal:", int(peft_lp.argmax()) == int(pudl_lp.argmax()),
      "adapter moves logp by up to:", float(np.abs(peft_lp - base_lp)[np.argsort(-pudl_lp)[:50]].max()))
