import torch

from safety_decoding.attention import NAME, ess_sdpa
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class _Module(torch.nn.Module):
    num_key_value_groups = 3


def test_gqa_path_equals_transformers_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 3, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    mask = torch.rand(2, 1, 3, 20) > 0.4
    mask[..., 0] = True  # every row sees something
    m = _Module().eval()
    ours, _ = ess_sdpa(m, q, k, v, mask, scaling=0.25)
    ref, _ = sdpa_attention_forward(m, q, k, v, mask, scaling=0.25)
    assert ours.shape == (2, 3, 9, 16)
    torch.testing.assert_close(ours, ref)


def test_decoder_switches_the_model_to_ess_sdpa(tiny_model, tokenizer):
    from safety_decoding.decode import Decoder

    Decoder(tiny_model, tokenizer)
    assert tiny_model.lm.config._attn_implementation == NAME


def test_slot_cache_matches_dynamic_cache(tiny_model):
    """In-place K/V writes, crops and re-buffering give the same forwards as DynamicCache."""
    from transformers import DynamicCache

    from safety_decoding.kv_cache import SlotCache

    lm = tiny_model.lm.model
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 70))
    outs = []
    for cache in (DynamicCache(config=lm.config), SlotCache(lm.config)):
        with torch.inference_mode():
            lm(input_ids=ids[:, :60], cache=cache, use_cache=True)
            steps = []
            for i in range(60, 70):  # a probe-like extra row, cropped again, grows past capacity
                h = lm(input_ids=ids[:, i:i + 1].repeat(1, 2), cache=cache, use_cache=True,
                       position_ids=torch.tensor([[i, 0]] * 2)).last_hidden_state
                cache.crop(-1)
                steps.append(h)
            if isinstance(cache, SlotCache):
                for layer in cache.layers:  # what DecodeBatch does when a row leaves
                    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]
            else:
                cache.batch_select_indices(torch.tensor([1]))
            steps.append(lm(input_ids=ids[[1], :1], cache=cache, use_cache=True,
                            position_ids=torch.tensor([[70]])).last_hidden_state)
        outs.append((steps, cache.get_seq_length()))
    assert outs[0][1] == outs[1][1] == 71
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b)
