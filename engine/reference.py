"""transformers' own generate over an HF directory: the reference our engine is measured against.

Used by ``moeserve generate`` (an offline completion without a server) and by tests that compare the
engine's tokens with ``generate(do_sample=False)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TextIO

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The configuration's dtype names (engine.config) as torch dtypes, for this reference and the engine alike."""


def load_reference(model_dir: str | Path, dtype: str = "auto") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, on the CPU) and tokenizer of ``model_dir``; ``dtype`` auto keeps the checkpoint's."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    torch_dtype = "auto" if dtype == "auto" else TORCH_DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of ``prompt``; with ``chat``, a user message under the chat template plus the generation prompt."""
    if not chat:
        return tokenizer(prompt).input_ids
    if tokenizer.chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; run without --chat")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def generate_text(
    model_dir: str | Path,
    prompt: str,
    *,
    chat: bool = False,
    max_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    stream: TextIO | None = None,
) -> str:
    """Generate a completion of ``prompt`` with transformers; returns the text and streams it to ``stream``.

    ``temperature`` 0 is greedy decoding; otherwise multinomial sampling seeded with ``seed``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    model, tokenizer = load_reference(model_dir, dtype)
    input_ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)])
    streamer = _Streamer(tokenizer, stream) if stream is not None else None
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


class _Streamer(TextStreamer):
    """transformers' TextStreamer writing to a given text stream instead of print."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self._stream.write(text + ("\n" if stream_end else ""))
        self._stream.flush()
