"""Tiny, deterministic, fully offline causal language models for tests.

:func:`make_tiny_model` writes a small randomly initialised HuggingFace model
(Llama, GPT-2 or Qwen2 architecture) together with a ByteLevel BPE tokenizer
trained locally on a short embedded English corpus.  Nothing is downloaded:
the result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir)`` with ``HF_HUB_OFFLINE=1``.

Builds are deterministic: the same arguments (and library versions) give
byte-identical files, so the directories can be cached or compared across
processes and machines.  The weights are random, so the model's outputs are
meaningless; they are only well-scaled (normal init with std 0.02, unit norm
weights, zero biases).  The tokenizer has a single special token,
``<|endoftext|>`` (id 0), used as bos, eos, unk and pad; it adds no special
tokens when encoding.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["make_tiny_model", "ARCHS", "SPECIAL_TOKEN", "SPECIAL_TOKEN_ID"]

PathT = TypeVar("PathT", str, os.PathLike)

ARCHS: tuple[str, ...] = ("llama", "gpt2", "qwen2")
SPECIAL_TOKEN = "<|endoftext|>"
SPECIAL_TOKEN_ID = 0
MAX_POSITIONS = 256
INIT_STD = 0.02
#: 256 byte-level symbols plus the special token.
MIN_VOCAB = 257
MARKER_FILE = "nnsight_dist_tiny.json"
_FORMAT_VERSION = 1

_CORPUS = """\
Hello world! The quick brown fox jumps over the lazy dog. A small model is a
useful thing to have when writing tests, because it loads in a moment and runs
on any machine. This text is here only so that a tokenizer can learn which
pieces of English appear most often: the, and, of, to, in, is, that, it, was.

Once upon a time there was a little village near the sea. Every morning the
people of the village walked down to the water, and every evening they came
back home with baskets full of fish. The children played on the sand while
their parents worked, and the old men told stories about ships and storms.

Science is the study of the natural world through observation and experiment.
Researchers ask questions, make predictions, and test them carefully. When the
results do not match the prediction, the theory must change. In this way our
understanding of the world grows a little bit every year.

Paris is the capital of France. Berlin is the capital of Germany. Rome is the
capital of Italy. Madrid is the capital of Spain. London is the capital of the
United Kingdom. Tokyo is the capital of Japan. The Eiffel Tower is in Paris.

Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4
5 6 7 8 9 10 11 12 100 1000 2024. Questions? Answers. "Quoted words", (notes),
[lists], {braces}; colons: and dashes - like this. I'm, you're, it's, don't.

def forward(self, x):
    return self.layer(x) + x
"""

_SYLLABLES = (
    "ka ri to mo na se lu vi da pe so gu ha ze bo ni ta ru me ko "
    "an er in on ul el ar or est ing ed ly tion ment ness able"
).split()


def _corpus_lines() -> list[str]:
    """The embedded corpus plus deterministic pseudo-words (more merges)."""
    lines = _CORPUS.splitlines()
    rng = random.Random(1234)
    for _ in range(400):
        words = [
            "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
            for _ in range(12)
        ]
        lines.append(" ".join(words))
    return lines


def _validate(arch: str, layers: int, hidden: int, heads: int, kv_heads: int,
              intermediate: int, vocab: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs are: {', '.join(ARCHS)}")
    sizes = dict(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                 vocab=vocab)
    if arch != "gpt2":  # gpt2 has no grouped-query attention: kv_heads is ignored
        sizes["kv_heads"] = kv_heads
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if arch != "gpt2" and heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if vocab < MIN_VOCAB:
        raise ValueError(
            f"vocab must be >= {MIN_VOCAB} (256 byte symbols + {SPECIAL_TOKEN}), got {vocab}")


def _train_tokenizer(vocab: int) -> Any:
    """Train a ByteLevel BPE tokenizer; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    assert tok.token_to_id(SPECIAL_TOKEN) == SPECIAL_TOKEN_ID
    assert tok.get_vocab_size() <= vocab, (tok.get_vocab_size(), vocab)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _make_config(arch: str, layers: int, hidden: int, heads: int, kv_heads: int,
                 intermediate: int, vocab: int) -> Any:
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(bos_token_id=SPECIAL_TOKEN_ID, eos_token_id=SPECIAL_TOKEN_ID,
               pad_token_id=SPECIAL_TOKEN_ID)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=MAX_POSITIONS, n_embd=hidden,
                          n_layer=layers, n_head=heads, n_inner=intermediate,
                          initializer_range=INIT_STD, **ids)
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
               num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=hidden // heads,
               max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
               initializer_range=INIT_STD, **ids)


@torch.no_grad()
def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter from a local generator, in name order.

    Independent of HF's own ``_init_weights`` (which may change between
    versions): biases 0, 1-D weights (norms) 1, everything else N(0, 0.02).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * INIT_STD)


def make_tiny_model(
    out_dir: PathT,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 4,
    intermediate: int = 256,
    vocab: int = 512,
    seed: int = 0,
) -> PathT:
    """Build a tiny random causal LM plus tokenizer in ``out_dir`` and return ``out_dir``.

    Args:
        out_dir: directory to write into (created if missing; known files are
            overwritten).
        arch: ``"llama"``, ``"gpt2"`` or ``"qwen2"``.
        layers, hidden, heads, intermediate, vocab: model sizes (for gpt2:
            ``n_layer``, ``n_embd``, ``n_head``, ``n_inner``, ``vocab_size``).
        kv_heads: key/value heads for llama/qwen2 (ignored for gpt2).
        seed: seed for the weight initialisation.

    The result holds ``config.json``, ``generation_config.json``,
    ``model.safetensors`` (float32), the tokenizer files and
    ``nnsight_dist_tiny.json`` (the build arguments).  The tokenizer is a
    ByteLevel BPE with ``min(vocab, ~5300)`` tokens (the embedded corpus
    supports no more merges; extra embedding rows are then never produced by
    the tokenizer); ``<|endoftext|>`` (id 0) is bos/eos/unk/pad in both
    tokenizer and config.  Positions are limited to 256.
    Same arguments -> byte-identical files.  The global torch RNG state is left
    untouched.  If ``out_dir`` already holds a build with identical arguments,
    it is reused without rebuilding.

    Raises:
        ValueError: unknown ``arch``, non-positive sizes, ``hidden`` not
            divisible by ``heads``, ``heads`` not divisible by ``kv_heads``,
            or ``vocab`` < 257.
    """
    _validate(arch, layers, hidden, heads, kv_heads, intermediate, vocab)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    import transformers
    from transformers import AutoModelForCausalLM

    path = Path(out_dir)
    marker = path / MARKER_FILE
    args = dict(arch=arch, layers=layers, hidden=hidden, heads=heads,
                kv_heads=kv_heads if arch != "gpt2" else None,
                intermediate=intermediate, vocab=vocab, seed=seed)
    meta = {"format_version": _FORMAT_VERSION,
            "transformers_version": transformers.__version__,
            "args": args}
    if _is_reusable(path, meta):
        return out_dir

    path.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # an interrupted rebuild must not look valid

    tokenizer = _train_tokenizer(vocab)
    config = _make_config(arch, layers, hidden, heads, kv_heads, intermediate, vocab)
    with torch.random.fork_rng(devices=[]):  # HF's init uses the global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed)
    model.eval()
    # accelerate imports DeepSpeed here when it is installed, and DeepSpeed's logger binds
    # itself to the stdout of that moment: the caller's stdout stays the caller's.
    with _no_progress_bars(), contextlib.redirect_stdout(sys.stderr):
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)

    marker.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence the "Writing model shards" bar, restoring the previous settings."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    tf_enabled = hf_logging.is_progress_bar_enabled()
    hub_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if tf_enabled:
            hf_logging.enable_progress_bar()
        if hub_disabled:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def _is_reusable(path: Path, meta: dict[str, Any]) -> bool:
    marker = path / MARKER_FILE
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return stored == meta and all((path / name).is_file() for name in needed)
