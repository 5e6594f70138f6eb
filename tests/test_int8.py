"""INT8 QLoRA base (nemo_jax/int8.py) against bitsandbytes' LLM.int8() weight format (its CPU path)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nemo_jax import int8

bnb = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_dequantize_equal_bitsandbytes(dtype):
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((96, 320)).astype(np.float32) * 0.02).to(dtype)
    w[3] = 0  # an all-zero row
    w[5, 7] = 0.5  # an outlier: it only sets its row's scale (no outlier columns at threshold 0)
    cb, scb, outliers = bnb.int8_vectorwise_quant(w.clone())
    assert outliers is None
    q, ours = int8.quantize_rows(jnp.asarray(w.float().numpy()))
    keep = np.arange(96) != 3  # bitsandbytes divides the zero row by 0; ours stays 0
    np.testing.assert_array_equal(np.asarray(q)[keep], cb.numpy()[keep])
    np.testing.assert_array_equal(np.asarray(q)[3], 0)
    np.testing.assert_array_equal(np.asarray(ours), scb.numpy())
    np.testing.assert_array_equal(np.asarray(int8.dequantize_rows(q, ours))[keep],
                                  bnb.int8_vectorwise_dequant(cb, scb).numpy()[keep])
    assert np.abs(np.asarray(q, np.int32)).max() == 127


def test_kernel_layout_round_trip():
    """Our [L, *in, *out] kernels (o's two input axes included) quantise per layer as torch's [out, in]."""
    rng = np.random.default_rng(1)
    for in_shape, out_shape in [((64,), (8, 16)), ((8, 16), (64,))]:
        k = rng.standard_normal((2, *in_shape, *out_shape)).astype(np.float32)
        q = int8.quantize_kernel(jnp.asarray(k), len(in_shape))
        assert q["int8"].shape == (2, 64 * 128) and q["scb"].shape == (2, int(np.prod(out_shape)))
        torch_w = torch.from_numpy(k[1].reshape(int(np.prod(in_shape)), -1).T.copy())
        cb, scb, _ = bnb.int8_vectorwise_quant(torch_w)
        np.testing.assert_array_equal(np.asarray(q["int8"][1]), cb.numpy().reshape(-1))
        back = int8.dequantize_kernel({"int8": q["int8"][1], "scb": q["scb"][1]}, in_shape, out_shape, jnp.float32)
        np.testing.assert_allclose(np.asarray(back), k[1], atol=np.abs(k[1]).max() / 127)
