"""Hand-written MLX loss kernels with explicit backward passes (shipped as ``pudl.kernels``)."""

from .listwise import dpo_loss, grpo_advantages, grpo_token_loss, ldl_loss, listmle_loss
from .logprobs import naive_token_logprobs, token_logprobs

__all__ = [
    "dpo_loss",
    "grpo_advantages",
    "grpo_token_loss",
    "ldl_loss",
    "listmle_loss",
    "naive_token_logprobs",
    "token_logprobs",
]
