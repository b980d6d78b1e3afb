"""``nd.LanguageModel``: loading options, tokenizer and config, kwargs passed through."""

from __future__ import annotations

import torch
import transformers

import nnsight_dist as nd
from conftest import LONG, SAME_LEN, SHORT, equal, recorder

PROMPT = SAME_LEN[0]


def test_dtype_float64(tiny_dirs, llama):
    model = nd.LanguageModel(tiny_dirs["llama"], dtype=torch.float64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float64).eval()
    assert {p.dtype for p in model._module.parameters()} == {torch.float64}
    with model.trace(PROMPT):
        h = model.model.layers[1].output.save()
        logits = model.lm_head.output.save()
    store = []
    handle = ref.model.layers[1].register_forward_hook(recorder(store))
    try:
        with torch.no_grad():
            expected = ref(**llama.encode(PROMPT)).logits
    finally:
        handle.remove()
    assert h.dtype == logits.dtype == torch.float64
    equal(h, store[0])
    equal(logits, expected)


def test_device_map_cpu(tiny_dirs, tiny):
    model = nd.LanguageModel(tiny_dirs[tiny.arch], device_map="cpu")
    assert {p.device.type for p in model._module.parameters()} == {"cpu"}
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    equal(logits, tiny.logits(PROMPT))


def test_from_built_model(tiny_dirs, llama):
    built = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs["llama"], padding_side="left")
    model = nd.LanguageModel(built, tokenizer=tok)
    with model.trace() as tracer:
        with tracer.invoke(LONG):
            a = model.lm_head.output.save()
        with tracer.invoke(SHORT):
            b = model.lm_head.output.save()
    expected = llama.logits([LONG, SHORT])
    equal(a, expected[0:1])
    equal(b, expected[1:2])


def test_tokenizer_and_config(tiny):
    tok = tiny.model.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token == tok.eos_token
    for prompt in (PROMPT, LONG, SHORT):
        assert tok(prompt)["input_ids"] == tiny.tok(prompt)["input_ids"]
    assert tiny.model.config is tiny.model._module.config
    assert tiny.model.config.to_dict() == tiny.ref.config.to_dict()
    assert tiny.model.config.model_type == tiny.arch


def test_forward_kwargs_pass_through(tiny):
    with tiny.model.trace(PROMPT, output_hidden_states=True) as tracer:
        result = tracer.result.save()
    with torch.no_grad():
        expected = tiny.ref(**tiny.encode(PROMPT), output_hidden_states=True)
    assert len(result.hidden_states) == len(expected.hidden_states)
    for got, ref in zip(result.hidden_states, expected.hidden_states):
        equal(got, ref)


def test_generation_kwargs_pass_through(tiny):
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, repetition_penalty=1.3,
                  return_dict_in_generate=True, output_scores=True)
    with tiny.model.generate(PROMPT, **kwargs) as tracer:
        result = tracer.result.save()
    expected = tiny.ref_generate(PROMPT, **kwargs)
    equal(result.sequences, expected.sequences)
    assert len(result.scores) == len(expected.scores)
    for got, ref in zip(result.scores, expected.scores):
        equal(got, ref)


def test_generation_length_kwargs(llama):
    with llama.model.generate([LONG, SHORT], max_new_tokens=5, min_new_tokens=5, do_sample=False) as tracer:
        tokens = tracer.result.save()
    expected = llama.ref_generate([LONG, SHORT], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    equal(tokens, expected)
    assert tokens.shape[1] == llama.encode([LONG, SHORT])["input_ids"].shape[1] + 5
