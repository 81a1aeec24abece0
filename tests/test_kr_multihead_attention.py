import pytest
import torch
from torch import nn

from lightning_kr.layers import KRMultiheadAttention, ReprChain


@pytest.mark.parametrize("batch_first", [True, False])
def test_neutral_conversion_equals_multihead_attention(batch_first):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    kr = KRMultiheadAttention.from_mha(mha, repr_dim=0, gate_scale=2.0, zero_init=True).eval()
    x = torch.randn(3, 5, 16)
    want, want_weights = mha(x, x, x, need_weights=True)
    got, got_weights = kr(x, x, x, need_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-5)
    got_fast, none = kr(x, x, x, need_weights=False)
    assert none is None
    torch.testing.assert_close(got_fast, want, rtol=1e-5, atol=1e-5)


def test_masks_match_multihead_attention():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    kr = KRMultiheadAttention.from_mha(mha, repr_dim=0, gate_scale=2.0, zero_init=True).eval()
    x = torch.randn(2, 4, 8)
    padding = torch.tensor([[False, False, False, True], [False, False, True, True]])
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    want, _ = mha(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=False)
    got, _ = kr(x, x, x, key_padding_mask=padding, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_two_links_of_the_chain_in_order():
    kr = KRMultiheadAttention(8, 2, batch_first=True, repr_dim=4)
    chain = ReprChain()
    kr.in_proj.attach(chain, "attn.in_proj")
    kr.out_proj.attach(chain, "attn.out_proj")
    x, d0 = torch.randn(2, 3, 8), torch.randn(2, 4)
    with chain.run(d0):
        kr(x, x, x, need_weights=False)
        d2 = chain.read("end", 2)
    _, d1 = kr.in_proj.forward_with_repr(x, d0)
    assert not torch.allclose(d1, d0)
    assert d2.shape == (2, 4) and not torch.allclose(d2, d1)


def test_cross_attention_is_refused():
    kr = KRMultiheadAttention(8, 2, batch_first=True, repr_dim=0)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="self-attention only"):
        kr(q, kv, kv)
