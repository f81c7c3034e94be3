import pytest

from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny random llama GGUF with Q4_1/Q8_0 blocks (fresh random weights every session)."""
    import random

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=random.randrange(1 << 30))


@pytest.fixture(scope="session")
def smollm2():
    from pudl.models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_gguf_f32(tmp_path_factory):
    """The same kind of tiny model with float32 weights (no quantization noise on either side)."""
    import random

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny32") / "tiny32.gguf", seed=random.randrange(1 << 30),
                           quantize=False)
