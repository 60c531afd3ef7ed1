"""Reward-model loading, input formats, readout, truncation, activations and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmsae.cache import ActivationCache
from rmsae.data import PreferencePair, Turn, parse_hh_dialogue
from rmsae.formats import render
from rmsae.hooks import capture_block_output, find_blocks
from rmsae.reward_model import RewardHeadError, load_reward_model

# fp32 rewards of one text in different batches differ only by summation order.
REWARD_TOLERANCE = 1e-4

MULTI_TURN_HH = (
    "\n\nHuman: How do I bake bread?"
    "\n\nAssistant: You need flour, water and yeast."
    "\n\nHuman: And salt?\n\nOnly a little?"
    "\n\nAssistant: Yes, about two percent of the flour weight."
)


def conversations() -> list[tuple[Turn, ...]]:
    """Eight conversations of different lengths, one of them multi-turn."""
    texts = [
        "Paris is the capital of France.",
        "I am sorry, but I cannot help with that.",
        "Mix flour, water, salt and yeast, then knead the dough for ten minutes and let it rise.",
        "Why did the chicken cross the road?",
        "Hello!",
        "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun all day long.",
        "No.",
    ]
    convs = [(Turn("user", "tell me something"), Turn("assistant", text)) for text in texts]
    convs.append(parse_hh_dialogue(MULTI_TURN_HH).turns)
    return convs


@pytest.fixture(scope="module", params=["llama", "qwen3", "score_model"])
def decoder_rm(request, tiny_models):
    return load_reward_model(str(tiny_models[request.param]), input_format="chat_template", max_length=128)


@pytest.fixture(scope="module")
def minilm_rm(minilm_path):
    return load_reward_model("all-minilm-l6-v2", allow_fresh_head=True, fresh_head_seed=3, max_length=128)


# -- formats ------------------------------------------------------------------------------------


def test_safe_rlhf_official_format():
    turns = parse_hh_dialogue(MULTI_TURN_HH).turns
    rendered = render(turns, "safe_rlhf")
    expected = (
        "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT: You need flour, water and yeast."
        " USER: And salt?\n\nOnly a little? ASSISTANT: Yes, about two percent of the flour weight."
    )
    assert rendered.text == expected
    assert rendered.text[rendered.response_start : rendered.response_end] == "Yes, about two percent of the flour weight."


def test_safe_rlhf_author_format():
    turns = parse_hh_dialogue(MULTI_TURN_HH).turns
    rendered = render(turns, "safe_rlhf_author")
    expected = (
        " USER: How do I bake bread? ASSISTANT: You need flour, water and yeast."
        " USER: And salt?\n\nOnly a little? ASSISTANT: Yes, about two percent of the flour weight."
    )
    assert rendered.text == expected


def test_hh_format_round_trip():
    turns = parse_hh_dialogue(MULTI_TURN_HH).turns
    rendered = render(turns, "hh")
    assert parse_hh_dialogue("\n\n" + rendered.text).turns == turns


def test_render_rejects_unknown_format():
    with pytest.raises(ValueError, match="Unknown input format 'alpaca'"):
        render(conversations()[0], "alpaca")


def test_render_needs_final_response():
    with pytest.raises(ValueError, match="ends with the assistant response"):
        render((Turn("user", "hi"),), "hh")


# -- layer convention and hooks -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen3", "score_model"])
def test_hook_equals_hidden_states(kind, tiny_models):
    rm = load_reward_model(str(tiny_models[kind]), input_format="chat_template")
    ids = torch.tensor([rm.encode(rm.render(conversations()[2])).input_ids])
    trunk = rm.model.model
    # The last entry of transformers' hidden_states is after the final norm, so only inner blocks
    # are compared; the hook itself returns every block's raw output.
    for layer in range(rm.num_layers - 1):
        with capture_block_output(rm.model, layer) as captured:
            outputs = trunk(input_ids=ids, output_hidden_states=True)
        assert torch.equal(captured["hidden"], outputs.hidden_states[layer + 1])


def test_hook_equals_hidden_states_bert(minilm_rm):
    ids = torch.tensor([minilm_rm.encode(minilm_rm.render(conversations()[2])).input_ids])
    for layer in range(minilm_rm.num_layers):
        with capture_block_output(minilm_rm.model, layer) as captured:
            outputs = minilm_rm.model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(captured["hidden"], outputs.hidden_states[layer + 1])


@pytest.mark.parametrize(
    "model_class, config_kwargs",
    [
        ("GPT2ForSequenceClassification", dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)),
        ("MistralForSequenceClassification", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)),
        ("Gemma2ForSequenceClassification", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)),
    ],
)
def test_find_blocks_other_families(model_class, config_kwargs):
    import transformers

    model_type = {"GPT2": "gpt2", "Mistral": "mistral", "Gemma2": "gemma2"}[model_class.split("For")[0]]
    config = transformers.AutoConfig.for_model(model_type, num_labels=1, **config_kwargs)
    model = getattr(transformers, model_class)(config).eval()
    blocks = find_blocks(model)
    assert len(blocks) == 2
    ids = torch.tensor([[1, 5, 9, 12]])
    with capture_block_output(model, 0) as captured:
        outputs = model(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(captured["hidden"], outputs.hidden_states[1])


# -- readout and batching -----------------------------------------------------------------------


def test_batched_equals_unbatched(decoder_rm):
    convs = conversations()
    single = decoder_rm.score_conversations(convs, batch_size=1, progress=False)
    for padding_side in ("left", "right"):
        batched = decoder_rm.score_conversations(convs, batch_size=8, padding_side=padding_side, progress=False)
        assert np.abs(batched.rewards - single.rewards).max() < REWARD_TOLERANCE
    assert np.ptp(single.rewards) > 10 * REWARD_TOLERANCE


def test_minilm_batched_equals_unbatched(minilm_rm):
    convs = conversations()
    single = minilm_rm.score_conversations(convs, batch_size=1, progress=False)
    for padding_side in ("left", "right"):
        batched = minilm_rm.score_conversations(convs, batch_size=8, padding_side=padding_side, progress=False)
        assert np.abs(batched.rewards - single.rewards).max() < REWARD_TOLERANCE


def test_pad_equal_eot_read_at_last_token(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    assert rm.tokenizer.pad_token_id == rm.tokenizer.convert_tokens_to_ids("<|eot|>")
    conv = conversations()[-1]
    encoded = rm.encode(rm.render(conv))
    assert encoded.input_ids[-1] == rm.tokenizer.pad_token_id  # the text ends with the end-of-turn token

    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        last_hidden = rm.model.model(input_ids=ids).last_hidden_state
        expected = rm.model.score(last_hidden[0, -1]).item()
    batched = rm.score_conversations([conv, conversations()[5], conversations()[4]], batch_size=3, progress=False)
    assert batched.rewards[0] == pytest.approx(expected, abs=REWARD_TOLERANCE)


def test_score_model_end_score(tiny_models):
    rm = load_reward_model(str(tiny_models["score_model"]), input_format="safe_rlhf")
    assert rm.spec.architecture == "score_model"
    conv = conversations()[0]
    ids = torch.tensor([rm.encode(rm.render(conv)).input_ids])
    with torch.no_grad():
        output = rm.model(input_ids=ids)
    assert output.scores.shape == (1, ids.shape[1], 1)
    score = rm.score_conversations([conv], progress=False).rewards[0]
    assert score == pytest.approx(output.end_scores[0, 0].item(), abs=REWARD_TOLERANCE)
    assert score == pytest.approx(output.scores[0, -1, 0].item(), abs=REWARD_TOLERANCE)


def test_unregistered_score_model_detected(tiny_models):
    rm = load_reward_model(str(tiny_models["score_model"]))
    assert rm.spec.architecture == "score_model"
    assert rm.spec.input_format == "safe_rlhf"


# -- BOS and truncation -------------------------------------------------------------------------


def test_chat_template_single_bos(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    rendered = rm.render(conversations()[-1])
    assert rendered.template_bos
    assert not rendered.text.startswith("<s>")
    ids = rm.encode(rendered).input_ids
    bos = rm.tokenizer.bos_token_id
    assert ids[0] == bos
    assert ids.count(bos) == 1


def test_chat_template_response_span_when_template_trims(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    rendered = rm.render((Turn("user", "Capital?"), Turn("assistant", "  Paris is the capital.\n")))
    assert rendered.text[rendered.response_start : rendered.response_end] == "Paris is the capital."
    assert any(rm.encode(rendered).response_mask)


def test_truncation_keeps_response_end(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="safe_rlhf", max_length=24)
    long_prompt = "please tell me " * 60
    response = "The quick brown fox jumps."
    conv = (Turn("user", long_prompt), Turn("assistant", response))
    full = rm.tokenizer(rm.render(conv).text)["input_ids"]
    encoded = rm.encode(rm.render(conv))
    assert len(encoded) == 24
    assert encoded.n_truncated == len(full) - 24
    assert encoded.input_ids[0] == rm.tokenizer.bos_token_id
    assert encoded.input_ids[-8:] == tuple(full[-8:])
    assert not encoded.response_truncated
    assert rm.tokenizer.decode(encoded.input_ids).endswith(response)


def test_truncation_of_response_reported(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="safe_rlhf", max_length=8)
    conv = (Turn("user", "hi"), Turn("assistant", "the quick brown fox jumps over the lazy dog " * 3))
    encoded = rm.encode(rm.render(conv))
    assert len(encoded) == 8
    assert encoded.response_truncated
    assert all(encoded.response_mask[1:])


def test_pairs_report_truncation(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="safe_rlhf", max_length=24)
    short = PreferencePair((Turn("user", "hi"),), "Hello!", "No.")
    long = PreferencePair((Turn("user", "please tell me " * 60),), "Hello!", "No.")
    scores = rm.score_pairs([short, long], progress=False)
    assert scores.truncated.tolist() == [False, True]
    assert scores.response_truncated.tolist() == [False, False]


# -- pooled activations -------------------------------------------------------------------------


def test_pooling_matches_manual_mean(tiny_models):
    rm = load_reward_model(str(tiny_models["qwen3"]), input_format="chat_template")
    convs = conversations()
    result = rm.score_conversations(
        convs, layers=(0, 1), poolings=("mean", "mean_response", "mean_no_bos"), batch_size=4,
        padding_side="left", progress=False,
    )
    for index in (0, 5, 7):
        encoded = rm.encode(rm.render(convs[index]))
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            states = rm.model.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        response = torch.tensor(encoded.response_mask)
        np.testing.assert_allclose(result.pooled[(1, "mean")][index], states.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(result.pooled[(1, "mean_response")][index], states[response].mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(result.pooled[(1, "mean_no_bos")][index], states[1:].mean(0).numpy(), atol=1e-5)


def test_response_mask_covers_response(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    conv = conversations()[0]
    encoded = rm.encode(rm.render(conv))
    response_ids = [token for token, keep in zip(encoded.input_ids, encoded.response_mask) if keep]
    assert rm.tokenizer.decode(response_ids).strip() == conv[-1].content


def test_score_rejects_bad_arguments(decoder_rm):
    convs = conversations()[:2]
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        decoder_rm.score_conversations(convs, layers=(3,), progress=False)
    with pytest.raises(TypeError, match="layer must be an integer"):
        decoder_rm.score_conversations(convs, layers=("1",), progress=False)
    with pytest.raises(ValueError, match="Unknown pooling"):
        decoder_rm.score_conversations(convs, layers=(1,), poolings=("max",), progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        decoder_rm.score_conversations(convs, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="padding_side"):
        decoder_rm.score_conversations(convs, padding_side="middle", progress=False)


# -- loading checks -----------------------------------------------------------------------------


def test_missing_head_rejected(tmp_path, tiny_models):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = LlamaConfig.from_pretrained(tiny_models["llama"])
    LlamaModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(RewardHeadError, match="no reward-head weights"):
        load_reward_model(str(tmp_path), input_format="chat_template")
    rm = load_reward_model(str(tmp_path), input_format="chat_template", allow_fresh_head=True, fresh_head_seed=1)
    again = load_reward_model(str(tmp_path), input_format="chat_template", allow_fresh_head=True, fresh_head_seed=1)
    assert rm.identity == again.identity
    assert torch.equal(rm.model.score.weight, again.model.score.weight)


def test_score_model_without_head_rejected(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_models["score_model"] / name).read_bytes())
    weights = load_file(tiny_models["score_model"] / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("score_head.")}, tmp_path / "model.safetensors")
    with pytest.raises(RewardHeadError, match="score_head.weight"):
        load_reward_model(str(tmp_path))


def test_two_logit_head_rejected(tmp_path, tiny_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    llama_config = LlamaConfig.from_pretrained(tiny_models["llama"], num_labels=2)
    AutoModelForSequenceClassification.from_config(llama_config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path)
    with pytest.raises(RewardHeadError, match="outputs 2 values"):
        load_reward_model(str(tmp_path), input_format="chat_template")


def test_unknown_model_path_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a registered tag"):
        load_reward_model(str(tmp_path / "does-not-exist"))


def test_bad_load_options(tiny_models):
    with pytest.raises(ValueError, match="Unknown input format"):
        load_reward_model(str(tiny_models["llama"]), input_format="alpaca")
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_reward_model(str(tiny_models["llama"]), dtype="int8")
    with pytest.raises(ValueError, match="max_length must be an integer"):
        load_reward_model(str(tiny_models["llama"]), max_length=1)


# -- activation cache ---------------------------------------------------------------------------


def test_cache_second_call_skips_model(tmp_path, tiny_models, monkeypatch):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    convs = conversations()
    with ActivationCache(rm.cache_namespace(), tmp_path) as cache:
        first = rm.score_conversations(convs, layers=(1,), batch_size=3, cache=cache, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the model ran although every text was cached")

    monkeypatch.setattr(rm, "forward_encoded", fail)
    with ActivationCache(rm.cache_namespace(), tmp_path) as cache:
        second = rm.score_conversations(convs, layers=(1,), batch_size=3, cache=cache, progress=False)
        assert cache.hits == len(convs)
    np.testing.assert_array_equal(first.rewards, second.rewards)
    np.testing.assert_array_equal(first.pooled[(1, "mean")], second.pooled[(1, "mean")])
    np.testing.assert_array_equal(first.n_tokens, second.n_tokens)


def test_cache_new_layer_recomputes(tmp_path, tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    convs = conversations()[:3]
    with ActivationCache(rm.cache_namespace(), tmp_path) as cache:
        rm.score_conversations(convs, layers=(0,), cache=cache, progress=False)
        result = rm.score_conversations(convs, layers=(1,), cache=cache, progress=False)
        assert cache.misses == 6
    assert result.pooled[(1, "mean")].shape == (3, 64)


def test_cache_put_is_atomic(tmp_path):
    from rmsae.cache import CachedText

    namespace = {"model": "x"}
    with ActivationCache(namespace, tmp_path) as cache:
        good = CachedText(1.0, 3, 0, False, {(0, "mean"): np.ones(4, dtype=np.float32)})
        bad = CachedText(2.0, 3, 0, False, {(0, "mean"): object()})  # not convertible to float32
        with pytest.raises(TypeError):
            cache.put({"a": good, "b": bad})
    with ActivationCache(namespace, tmp_path) as reader:
        assert len(reader) == 0
        assert reader.get(["a", "b"], layers=(0,), poolings=("mean",)) == {}


def test_cache_namespace_mismatch(tmp_path, tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    with ActivationCache({"model": "other"}, tmp_path) as cache:
        with pytest.raises(ValueError, match="belongs to another model"):
            rm.score_conversations(conversations()[:1], cache=cache, progress=False)


def test_identity_changes_with_format_and_head(tiny_models):
    chat = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    plain = load_reward_model(str(tiny_models["llama"]), input_format="hh")
    qwen = load_reward_model(str(tiny_models["qwen3"]), input_format="hh")
    assert chat.identity == plain.identity
    assert chat.cache_namespace() != plain.cache_namespace()
    assert qwen.identity != plain.identity


def test_pad_to_keeps_rewards(tiny_models):
    rm = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    encoded = [rm.encode(rm.render(conversations()[0]))]
    plain, _, _ = rm.forward_encoded(encoded)
    padded, _, _ = rm.forward_encoded(encoded, pad_to=len(encoded[0]) + 9)
    assert padded[0].item() == pytest.approx(plain[0].item(), abs=REWARD_TOLERANCE)
