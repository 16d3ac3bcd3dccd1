"""Quantisation formats: dequantisation against hand-built bytes decoded by a pure-Python formula,
quantise -> dequantise error bounds, odd shapes, Hadamard order, safetensors round-trip."""

import math
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels import quant

# Restated here (not imported) so the tests check the module against the spec, not itself.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e4m3_byte_value(byte: int) -> float:
    """float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN, no inf."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0x0F, byte & 0x07
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e8m0_byte_value(byte: int) -> float:
    return 2.0 ** (byte - 127)


def random_e4m3_bytes(rng: random.Random, n: int) -> list[int]:
    return [rng.choice([b for b in range(256) if b not in (0x7F, 0xFF)]) for _ in range(n)]


def bytes_tensor(values: list[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).reshape(shape).view(dtype)


# ---------------------------------------------------------------------------------------------
# e8m0 helpers
# ---------------------------------------------------------------------------------------------

def test_e8m0_to_float_matches_formula_for_every_byte():
    values = quant.e8m0_to_float(bytes_tensor(list(range(255)), (255,), torch.float8_e8m0fnu))
    expected = torch.tensor([e8m0_byte_value(b) for b in range(255)], dtype=torch.float64)
    assert torch.equal(values.to(torch.float64), expected)
    assert torch.isnan(quant.e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()


def test_float_to_e8m0_round_trip_and_rejects_non_powers_of_two():
    powers = torch.tensor([2.0 ** -127, 2.0 ** -20, 0.5, 1.0, 2.0, 2.0 ** 100, 2.0 ** 127], dtype=torch.float64)
    scale = quant.float_to_e8m0(powers)
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.view(torch.uint8).tolist() == [0, 107, 126, 127, 128, 227, 254]
    assert torch.equal(quant.e8m0_to_float(scale).to(torch.float64), powers)
    for bad in ([3.0], [0.0], [-2.0], [float("inf")], [2.0 ** -130]):
        with pytest.raises(ValueError, match="power_of_two"):
            quant.float_to_e8m0(torch.tensor(bad, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# FP8 block-128 weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(128, 256), (130, 200), (5, 3)])
def test_fp8_block_dequantize_matches_hand_built_bytes(shape):
    rng = random.Random(sum(shape))
    out_dim, in_dim = shape
    weight_bytes = random_e4m3_bytes(rng, out_dim * in_dim)
    scale_shape = (math.ceil(out_dim / 128), math.ceil(in_dim / 128))
    scale_bytes = [rng.randint(100, 150) for _ in range(scale_shape[0] * scale_shape[1])]
    w = bytes_tensor(weight_bytes, shape, torch.float8_e4m3fn)
    scale = bytes_tensor(scale_bytes, scale_shape, torch.float8_e8m0fnu)

    got = quant.fp8_block_dequantize(w, scale, dtype=torch.float32)

    expected = [e4m3_byte_value(weight_bytes[o * in_dim + i])
                * e8m0_byte_value(scale_bytes[(o // 128) * scale_shape[1] + i // 128])
                for o in range(out_dim) for i in range(in_dim)]
    assert got.dtype == torch.float32 and got.shape == shape
    assert got.flatten().tolist() == expected


def test_fp8_block_dequantize_to_bfloat16_is_exact():
    w, scale = quant.fp8_block_quantize(torch.randn(130, 257))
    as_bf16 = quant.fp8_block_dequantize(w, scale, dtype=torch.bfloat16)
    assert torch.equal(as_bf16.to(torch.float32), quant.fp8_block_dequantize(w, scale))


def test_fp8_block_dequantize_accepts_float32_scales():
    w, scale = quant.fp8_block_quantize(torch.randn(200, 300))
    plain = quant.e8m0_to_float(scale)
    assert torch.equal(quant.fp8_block_dequantize(w, plain), quant.fp8_block_dequantize(w, scale))


@pytest.mark.parametrize("shape", [(256, 384), (130, 300), (1, 7), (129, 129)])
def test_fp8_block_round_trip_error_bound(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # a wide dynamic range per row
    w_fp8, scale = quant.fp8_block_quantize(w)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == shape
    assert scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    back = quant.fp8_block_dequantize(w_fp8, scale)
    scale_full = quant.e8m0_to_float(scale).repeat_interleave(128, 0).repeat_interleave(128, 1)
    scale_full = scale_full[: shape[0], : shape[1]]
    # half an ulp: 2^-4 relative for normal e4m3 values, 2^-10 * scale in the subnormal range
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale_full * 2.0 ** -10)
    err = (back - w).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, max excess {(err - bound).max():.3g}"


def test_fp8_block_scale_is_smallest_power_of_two_that_fits_448():
    w = torch.zeros(256, 256)
    w[0, 0] = 448.0        # block (0, 0): fits exactly with scale 1
    w[0, 200] = 449.0      # block (0, 1): needs scale 2
    w[130, 5] = -0.75      # block (1, 0): 0.75 / 2^-9 = 384 <= 448, 0.75 / 2^-10 = 768 > 448
    w_fp8, scale = quant.fp8_block_quantize(w)
    exponents = scale.view(torch.uint8).to(torch.int32) - 127
    assert exponents[0, 0] == 0 and exponents[0, 1] == 1 and exponents[1, 0] == -9
    assert exponents[1, 1] == -127  # an all-zero block
    assert quant.fp8_block_dequantize(w_fp8, scale)[130, 5] == -0.75


def test_fp8_block_bad_input_is_value_error():
    with pytest.raises(ValueError, match="w must be 2-D"):
        quant.fp8_block_quantize(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.fp8_block_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="block"):
        quant.fp8_block_quantize(torch.randn(4, 4), block=0)
    w, scale = quant.fp8_block_quantize(torch.randn(130, 130))
    with pytest.raises(ValueError, match="scale shape"):
        quant.fp8_block_dequantize(w, scale[:1])
    with pytest.raises(ValueError, match="w_fp8"):
        quant.fp8_block_dequantize(w.to(torch.float32), scale)


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------

def test_mxfp4_dequantize_matches_hand_packed_nibbles():
    rng = random.Random(7)
    out_dim, in_dim = 3, 96
    nibbles = [[rng.randrange(16) for _ in range(in_dim)] for _ in range(out_dim)]
    scale_bytes = [[rng.randint(110, 140) for _ in range(in_dim // 32)] for _ in range(out_dim)]
    packed_bytes = []
    for row in nibbles:
        for k in range(in_dim // 2):
            byte = row[2 * k] | (row[2 * k + 1] << 4)  # low nibble = even column
            packed_bytes.append(byte - 256 if byte > 127 else byte)
    packed = torch.tensor(packed_bytes, dtype=torch.int8).reshape(out_dim, in_dim // 2)
    scale = bytes_tensor(sum(scale_bytes, []), (out_dim, in_dim // 32), torch.float8_e8m0fnu)

    got = quant.mxfp4_dequantize(packed, scale, torch.float32)

    expected = [[E2M1[nibbles[o][i]] * e8m0_byte_value(scale_bytes[o][i // 32]) for i in range(in_dim)]
                for o in range(out_dim)]
    assert got.tolist() == expected


def test_mxfp4_nibble_order_on_a_single_byte():
    packed = torch.tensor([[0x72] * 16], dtype=torch.uint8).view(torch.int8)  # low 2 -> 1.0, high 7 -> 6.0
    scale = bytes_tensor([127], (1, 1), torch.float8_e8m0fnu)
    got = quant.mxfp4_dequantize(packed, scale)
    assert got[0, :4].tolist() == [1.0, 6.0, 1.0, 6.0]


def nearest_e2m1(v: float) -> float:
    grid = sorted(set(abs(x) for x in E2M1))
    magnitude = min(grid, key=lambda g: abs(abs(v) - g))
    return math.copysign(magnitude, v)


def test_mxfp4_round_trip_is_nearest_grid_value():
    torch.manual_seed(1)
    w = torch.randn(8, 64) * torch.tensor([0.01, 1.0, 100.0, 3.0]).repeat_interleave(2).unsqueeze(1)
    packed, scale = quant.mxfp4_quantize(w)
    assert packed.dtype == torch.int8 and packed.shape == (8, 32)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (8, 2)
    back = quant.mxfp4_dequantize(packed, scale)
    scales = quant.e8m0_to_float(scale)
    for o in range(8):
        for i in range(64):
            s = scales[o, i // 32].item()
            block = w[o, (i // 32) * 32:(i // 32 + 1) * 32]
            assert block.abs().max().item() / s <= 6.0 < 2 * block.abs().max().item() / s  # smallest scale
            assert back[o, i].item() == nearest_e2m1(w[o, i].item() / s) * s


def test_fp4_ties_round_to_even_code():
    # scale 1 (amax 6): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.75]])
    back = quant.fp4_block_dequantize(*quant.fp4_block_quantize(x, block=32), block=32)
    assert back.tolist() == [[6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -1.0]]


def test_fp4_block_quantize_handles_leading_dims_and_ragged_blocks():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 80, dtype=torch.bfloat16)
    packed, scale = quant.fp4_block_quantize(x, block=32)
    assert packed.shape == (2, 3, 40) and scale.shape == (2, 3, 3)
    back = quant.fp4_block_dequantize(packed, scale, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    # the error is at most half the widest grid gap (1.0) times the block scale
    scale_full = quant.e8m0_to_float(scale).repeat_interleave(32, -1)[..., :80]
    assert bool(((back.float() - x.float()).abs() <= scale_full).all())


def test_mxfp4_bad_input_is_value_error():
    with pytest.raises(ValueError, match="even"):
        quant.mxfp4_quantize(torch.randn(4, 33))
    packed, scale = quant.mxfp4_quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="scale shape"):
        quant.mxfp4_dequantize(packed, scale[:, :1])
    with pytest.raises(ValueError, match="packed"):
        quant.mxfp4_dequantize(packed.float(), scale)


# ---------------------------------------------------------------------------------------------
# KV cache FP8 simulation, activation quantisation
# ---------------------------------------------------------------------------------------------

def reference_block_scale_exponent(amax: float, floor: float, max_code: float) -> int:
    return math.ceil(math.log2(max(amax, floor) / max_code))


def test_fp8_kv_quantize_layout_and_scales():
    torch.manual_seed(3)
    x = (torch.randn(2, 4, 512) * torch.logspace(-2, 2, 512)).to(torch.bfloat16)
    x[0, 0, :64] = 0  # an all-zero block uses the 1e-4 amax floor
    nope, rope, scale = quant.fp8_kv_quantize(x, nope_dim=448)
    assert nope.dtype == torch.float8_e4m3fn and nope.shape == (2, 4, 448)
    assert rope.dtype == torch.bfloat16 and torch.equal(rope, x[..., 448:])
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (2, 4, 7)

    exponents = scale.view(torch.uint8).to(torch.int32) - 127
    for idx in [(0, 0, 0), (0, 0, 3), (1, 2, 6), (1, 3, 0)]:
        amax = x[idx[0], idx[1], idx[2] * 64:(idx[2] + 1) * 64].float().abs().max().item()
        assert exponents[idx].item() == reference_block_scale_exponent(amax, 1e-4, 448.0)
    assert exponents[0, 0, 0].item() == -22

    back = quant.fp8_kv_dequantize(nope, rope, scale)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert torch.equal(back[..., 448:], x[..., 448:])
    scale_full = quant.e8m0_to_float(scale).repeat_interleave(64, -1)
    expected_nope = (x[..., :448].float() / scale_full).to(torch.float8_e4m3fn).float() * scale_full
    assert torch.equal(back[..., :448].float(), expected_nope)


def test_fp8_kv_matches_activation_quant_with_block_64():
    torch.manual_seed(4)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    back = quant.fp8_kv_dequantize(*quant.fp8_kv_quantize(x, 448, block=64), block=64)
    assert torch.equal(back[:, :448], quant.act_quant_fp8(x[:, :448], block=64))


def test_fp8_kv_bad_input_is_value_error():
    x = torch.randn(2, 512)
    with pytest.raises(ValueError, match="nope_dim"):
        quant.fp8_kv_quantize(x, nope_dim=600)
    nope, rope, scale = quant.fp8_kv_quantize(x, nope_dim=448)
    with pytest.raises(ValueError, match="scale shape"):
        quant.fp8_kv_dequantize(nope, rope, scale[:, :6])


def test_act_quant_fp8_values_and_error_bound():
    torch.manual_seed(5)
    x = torch.randn(3, 200) * 10
    y = quant.act_quant_fp8(x, block=128)
    assert y.dtype == x.dtype and y.shape == x.shape
    for row in range(3):
        for start in (0, 128):
            chunk = x[row, start:start + 128]
            exponent = reference_block_scale_exponent(chunk.abs().max().item(), 1e-4, 448.0)
            expected = torch.tensor([e4m3_round(v / 2.0 ** exponent) * 2.0 ** exponent for v in chunk.tolist()])
            assert torch.equal(y[row, start:start + 128], expected)
    assert torch.equal(quant.act_quant_fp8(torch.zeros(2, 128)), torch.zeros(2, 128))


FINITE_E4M3 = [(b, e4m3_byte_value(b)) for b in range(256) if b not in (0x7F, 0xFF)]


def e4m3_round(v: float) -> float:
    """Nearest e4m3 value by brute force over all finite bytes, saturating at 448; ties go to the
    even mantissa (IEEE round-half-to-even)."""
    v = max(-448.0, min(448.0, v))
    return min(FINITE_E4M3, key=lambda bv: (abs(bv[1] - v), bv[0] & 1))[1]


# ---------------------------------------------------------------------------------------------
# Hadamard
# ---------------------------------------------------------------------------------------------

def sylvester(n: int) -> list[list[int]]:
    h = [[1]]
    while len(h) < n:
        h = [row + row for row in h] + [row + [-v for v in row] for row in h]
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_is_sylvester_order_and_orthonormal(n):
    rotated = quant.hadamard_rotate(torch.eye(n, dtype=torch.float64))
    expected = torch.tensor(sylvester(n), dtype=torch.float64) / math.sqrt(n)
    assert torch.allclose(rotated, expected, atol=1e-12, rtol=0)
    assert torch.allclose(rotated @ rotated.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_on_vectors_keeps_dtype_and_norm():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 128)
    y = quant.hadamard_rotate(x)
    expected = x @ (torch.tensor(sylvester(128), dtype=torch.float32) / math.sqrt(128))
    assert y.dtype == x.dtype and torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert quant.hadamard_rotate(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard_rotate(torch.randn(4, 96))


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

def test_safetensors_round_trip_of_quantised_dtypes(tmp_path):
    torch.manual_seed(7)
    w_fp8, w_scale = quant.fp8_block_quantize(torch.randn(130, 260))
    packed, fp4_scale = quant.mxfp4_quantize(torch.randn(16, 64))
    tensors = {"w.weight": w_fp8, "w.scale": w_scale, "e.weight": packed, "e.scale": fp4_scale}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))

    loaded = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header_dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        sliced_scale = f.get_slice("w.scale")[1:2]
    assert header_dtypes == {"w.weight": "F8_E4M3", "w.scale": "F8_E8M0", "e.weight": "I8", "e.scale": "F8_E8M0"}
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8))
    assert torch.equal(sliced_scale.view(torch.uint8), w_scale[1:2].view(torch.uint8))
