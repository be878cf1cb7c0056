"""Text encoders through transformers (docs/official-formats.md#text-encoder): tiny random Gemma and T5 built
locally."""

from __future__ import annotations

import pytest
import torch

from models.text_encoder import TextEncoder, TextEncoderConfig
from tests.tiny_models import make_tiny_t5, make_tiny_text_encoder


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return make_tiny_text_encoder(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def test_decoder_right_padding_multiple_of_8_and_bos_only_empty_prompt(gemma_path):
    enc = TextEncoder.from_pretrained(gemma_path)  # the saved tokenizer pads LEFT: the wrapper must force right
    prompts = ["", "a red cat", "a big blue house on a hill near the river at sunset"]
    feats, mask = enc.encode(prompts)
    assert feats.shape == (3, 16, 32) and mask.dtype == torch.bool
    assert feats.shape[1] % 8 == 0
    ids = enc.tokenize(prompts)["input_ids"]
    assert mask.sum(1).tolist() == [1, 4, 13]
    for row in mask:  # right padding: valid tokens first
        n = int(row.sum())
        assert bool(row[:n].all()) and not bool(row[n:].any())
    assert ids[0, 0] == enc.tokenizer.bos_token_id  # "" is just [BOS]
    assert torch.all(ids[:, 0] == enc.tokenizer.bos_token_id)


def test_decoder_features_are_hidden_states_minus_two(gemma_path):
    from transformers import AutoModel, AutoTokenizer

    enc = TextEncoder.from_pretrained(gemma_path)
    feats, _ = enc.encode(["a small dog"])
    tok = AutoTokenizer.from_pretrained(gemma_path)
    model = AutoModel.from_pretrained(gemma_path).eval()
    ids = tok(["a small dog"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    n = ids["input_ids"].shape[1]
    assert torch.allclose(feats[0, :n], hidden[-2][0], atol=1e-5)  # second-to-last layer, before the final norm
    assert not torch.allclose(hidden[-2][0], hidden[-1][0], atol=1e-3)
    last = TextEncoder.from_pretrained(gemma_path, layer=-1).encode(["a small dog"])[0]
    assert torch.allclose(last[0, :n], hidden[-1][0], atol=1e-5)


def test_prompt_features_do_not_depend_on_the_batch(gemma_path):
    enc = TextEncoder.from_pretrained(gemma_path)
    alone, mask_alone = enc.encode(["a green tree"])
    batch, _ = enc.encode(["a green tree", "an old house with a red car on the road near a forest"])
    n = int(mask_alone[0].sum())
    assert torch.allclose(alone[0, :n], batch[0, :n], atol=1e-5)  # right padding + causal attention


def test_truncation_to_max_length(gemma_path):
    enc = TextEncoder.from_pretrained(gemma_path, max_length=8)
    feats, mask = enc.encode(["a " * 40])
    assert feats.shape[1] == 8 and int(mask.sum()) == 8


def test_t5_encoder_appends_eos_and_uses_last_hidden_state(t5_path):
    from transformers import T5EncoderModel

    enc = TextEncoder.from_pretrained(t5_path, kind="t5")
    feats, mask = enc.encode(["a cat", ""])
    assert feats.shape == (2, 8, 32) and mask.sum(1).tolist() == [3, 1]
    ids = enc.tokenize(["a cat"])["input_ids"]
    assert ids[0, 2] == enc.tokenizer.eos_token_id
    model = T5EncoderModel.from_pretrained(t5_path).eval()
    with torch.no_grad():
        ref = model(input_ids=ids[:, :3]).last_hidden_state
    assert torch.allclose(feats[0, :3], ref[0], atol=1e-5)


def test_tokenizer_without_bos_still_gives_the_empty_prompt_one_token(gemma_path):
    from tokenizers import processors

    enc = TextEncoder.from_pretrained(gemma_path)
    enc.tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    feats, mask = enc.encode(["", "a cat"])  # like Qwen: no BOS, so "" would have no token at all
    assert mask.sum(1).tolist() == [1, 2]
    assert torch.isfinite(feats).all()
    alone, alone_mask = enc.encode([""])  # a batch of empty prompts only (the null features of caption dropout)
    assert alone_mask.tolist() == [[True] + [False] * 7]
    torch.testing.assert_close(alone[0, :1], feats[0, :1])


def test_bad_inputs(gemma_path, tmp_path):
    with pytest.raises(ValueError, match="unknown text-encoder kind"):
        TextEncoderConfig(kind="bert")
    with pytest.raises((FileNotFoundError, OSError)):
        TextEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="at least one prompt"):
        TextEncoder.from_pretrained(gemma_path).encode([])


# ---- kinds read from the folder, CLAP, stacks (the audio model's dual encoder, paper §5.2) ---------------------------
@pytest.fixture(scope="module")
def stack_path(tmp_path_factory):
    from models.tiny import make_tiny_text_encoder_stack

    return make_tiny_text_encoder_stack(tmp_path_factory.mktemp("stack") / "dual")


def test_the_kind_is_read_from_the_folder(gemma_path, t5_path, stack_path):
    from models.text_encoder import describe

    assert TextEncoder.from_pretrained(t5_path).kind == "t5"  # a T5 folder needs no kind: T5EncoderModel loads it
    assert TextEncoder.from_pretrained(gemma_path).kind == "decoder"
    assert TextEncoder.from_pretrained(f"{stack_path}/clap").kind == "clap"
    assert describe(t5_path) == {"kind": "t5", "layer": -1, "max_length": 256, "pad_to_multiple_of": 8,
                                 "hidden_size": 32}
    assert describe(gemma_path)["layer"] == -2 and describe(f"{stack_path}/clap")["kind"] == "clap"
    assert describe(stack_path) == {"kind": "stack", "layer": None, "max_length": None, "pad_to_multiple_of": 8,
                                    "hidden_size": 32}


def test_clap_features_are_every_token_through_the_text_projection(stack_path):
    from transformers import ClapTextModelWithProjection

    enc = TextEncoder.from_pretrained(f"{stack_path}/clap")
    feats, mask = enc.encode(["a red cat", "a dog"])
    assert feats.shape == (2, 8, 32) and mask.sum(1).tolist() == [5, 4]  # <s> a red cat </s>
    model = ClapTextModelWithProjection.from_pretrained(f"{stack_path}/clap").eval()
    ids = enc.tokenize(["a red cat"])["input_ids"][:, :5]
    with torch.no_grad():
        out = model(input_ids=ids)
        ref = model.text_projection(out.last_hidden_state)
    torch.testing.assert_close(feats[0, :5], ref[0], atol=1e-5, rtol=1e-4)
    # the per-token features share CLAP's projection with its pooled embedding, so they are as wide as it
    assert ref.shape[-1] == out.text_embeds.shape[-1] == enc.hidden_size == 32


def test_a_stack_concatenates_each_part_on_its_own_field(stack_path):
    stack = TextEncoder.from_pretrained(stack_path)
    clap, t5 = stack.encoders
    assert stack.kind == "stack" and stack.fields == ("caption", "structured_caption") and stack.hidden_size == 32
    feats, mask = stack.encode(["a red cat", "a dog"], ["genre: jazz", "tempo: slow, genre: rock"])
    for b, (caption, structured) in enumerate([("a red cat", "genre: jazz"), ("a dog", "tempo: slow, genre: rock")]):
        f1, m1 = clap.encode([caption])
        f2, m2 = t5.encode([structured])
        n1, n2 = int(m1.sum()), int(m2.sum())
        assert int(mask[b].sum()) == n1 + n2 and bool(mask[b, : n1 + n2].all())  # right-padded, one valid run
        torch.testing.assert_close(feats[b, :n1], f1[0, :n1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats[b, n1: n1 + n2], f2[0, :n2], atol=1e-5, rtol=1e-4)
    assert feats.shape[1] % 8 == 0
    # without structured prompts the T5 part reads the prompts themselves
    same, same_mask = stack.encode(["a red cat"])
    explicit, explicit_mask = stack.encode(["a red cat"], ["a red cat"])
    assert torch.equal(same, explicit) and torch.equal(same_mask, explicit_mask)
    empty, empty_mask = stack.encode([""])
    assert int(empty_mask.sum()) == 3  # CLAP's <s></s> and T5's </s>: the empty prompt of dropout and CFG


def test_stack_errors_name_the_problem(stack_path, gemma_path, tmp_path):
    import json

    from models.text_encoder import STACK_FILE, describe, hidden_size_of, write_stack
    from models.tiny import make_tiny_t5

    wide = make_tiny_t5(tmp_path / "wide-t5", d_model=48)
    uneven = write_stack(str(tmp_path / "uneven"), [{"path": f"{stack_path}/clap"},
                                                    {"path": wide, "field": "structured_caption"}])
    with pytest.raises(ValueError, match="different widths"):
        hidden_size_of(uneven)
    with pytest.raises(ValueError, match="equally wide"):
        TextEncoder.from_pretrained(uneven)
    with pytest.raises(ValueError, match="own layer and max_length"):
        TextEncoder.from_pretrained(stack_path, layer=-2)
    with pytest.raises(FileNotFoundError, match="not a text-encoder stack"):
        TextEncoder.from_pretrained(gemma_path, kind="stack")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / STACK_FILE).write_text(json.dumps({"format": "lumina-ray/text-encoders",
                                                           "encoders": [{"path": "x", "field": "tags"}]}))
    with pytest.raises(ValueError, match="field 'tags'"):
        describe(str(tmp_path / "bad"))
    (tmp_path / "bad" / STACK_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        describe(str(tmp_path / "bad"))
