"""EnCodec in MLX vs transformers' EncodecModel on the tiny fixture, plus streaming decode.

Weights go through the real converter (SPEC layout, weight norm fused, MLX conv layouts), so these
tests also pin the converter's `audio_encoder.` output to what `mlx_models.encodec` expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_music.models.encodec import EncodecArgs, EncodecModel, EncodecStreamDecoder
from generation_helpers import snr_db
from tests.tiny_models import build_model, write_hub_folder

PREFIX = "audio_encoder."


def load_converted_encodec(mlx_folder: Path) -> tuple[EncodecModel, dict[str, mx.array]]:
    """Build the MLX EnCodec from a converted folder: config.json + every safetensors shard."""
    config = json.loads((mlx_folder / "config.json").read_text())
    weights: dict[str, mx.array] = {}
    for shard in sorted(mlx_folder.glob("*.safetensors")):
        weights.update({k[len(PREFIX):]: v for k, v in mx.load(str(shard)).items()
                        if k.startswith(PREFIX)})
    model = EncodecModel(EncodecArgs.from_dict(config["audio_encoder"]))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, weights


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers EncodecModel, MLX EncodecModel, converted weights) from one checkpoint."""
    from mlx_music.converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("encodec")
    hf = build_model("mono")
    write_hub_folder(hf, root / "hf")
    convert_checkpoint(root / "hf", root / "mlx", progress=False)
    model, weights = load_converted_encodec(root / "mlx")
    return hf.audio_encoder, model, weights


def _audio(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.3


def _hf_encode(hf, x: torch.Tensor) -> np.ndarray:
    # MusicGen passes no bandwidth, i.e. config.target_bandwidths[0] (2.2 kbps -> 4 levels).
    with torch.no_grad():
        out = hf.encode(x)
    assert out.audio_codes.shape[0] == 1  # no chunking in MusicGen's EnCodec
    return out.audio_codes[0].numpy()


def _hf_decode(hf, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf.decode(torch.from_numpy(codes.astype(np.int64))[None], [None]).audio_values.numpy()


def test_parameter_names_match_checkpoint(pair):
    _, model, weights = pair
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert names == set(weights)
    assert "encoder.layers.13.lstm.layers.1.Wh" in names
    assert "decoder.layers.12.conv.weight" in names  # last ConvTranspose1d
    assert "quantizer.layers.3.codebook.embed" in names


@pytest.mark.parametrize("samples", [16000, 12345, 641])  # whole frames, odd, just over one hop
def test_encode_matches_transformers(pair, samples):
    hf, model, _ = pair
    x = _audio((2, 1, samples), seed=samples)
    ref = _hf_encode(hf, x)
    codes = np.array(model.encode(mx.array(x.numpy())))
    assert codes.dtype == np.int32
    assert codes.shape == ref.shape == (2, 4, -(-samples // 640))
    np.testing.assert_array_equal(codes, ref)
    # The tiny random encoder's output barely moves with the input (codes come out nearly
    # constant), so equal codes alone prove little: also pin the embeddings themselves.
    with torch.no_grad():
        ref_emb = hf.encoder(x).numpy().transpose(0, 2, 1)
    emb = np.array(model.encoder(mx.array(x.numpy()).transpose(0, 2, 1)))
    assert np.abs(emb - ref_emb).max() <= 1e-5


def test_residual_quantizer_matches_transformers(pair):
    """RVQ on embeddings spread like the codebooks, so every level's choice is informative."""
    hf, model, _ = pair
    g = torch.Generator().manual_seed(7)
    emb = torch.randn((3, 16, 40), generator=g) * 1.5  # (B, codebook_dim, frames), HF layout
    with torch.no_grad():
        ref = hf.quantizer.encode(emb).transpose(0, 1).numpy()  # (B, nq, frames)
    codes = np.array(model.quantizer.encode(mx.array(emb.numpy()).transpose(0, 2, 1)))
    np.testing.assert_array_equal(codes, ref)
    assert len(np.unique(ref)) > ref.size // 2
    np.testing.assert_array_equal(  # fewer levels = a prefix of the levels
        np.array(model.quantizer.encode(mx.array(emb.numpy()).transpose(0, 2, 1), 2)), ref[:, :2])


@pytest.mark.parametrize("samples", [16000, 12345])
def test_decode_matches_transformers(pair, samples):
    hf, model, _ = pair
    codes = _hf_encode(hf, _audio((2, 1, samples), seed=samples + 1))
    ref = _hf_decode(hf, codes)
    audio = np.array(model.decode(mx.array(codes.astype(np.int32))))
    assert audio.shape == ref.shape == (2, 1, codes.shape[-1] * 640)
    assert np.abs(audio - ref).max() <= 1e-4
    assert ref.std() > 1e-2  # the fixture's decoder output is not flat


def test_decode_random_codes_and_building_blocks(pair):
    hf, model, _ = pair
    codes = np.random.default_rng(0).integers(0, 2048, (1, 4, 9)).astype(np.int32)
    ref = _hf_decode(hf, codes)
    audio = np.array(model.decode(mx.array(codes)))
    assert np.abs(audio - ref).max() <= 1e-4
    # quantizer.decode and decoder are channels-last building blocks of decode().
    emb = model.quantizer.decode(mx.array(codes))
    with torch.no_grad():
        ref_emb = hf.quantizer.decode(torch.from_numpy(codes.astype(np.int64)).transpose(0, 1))
    np.testing.assert_allclose(np.array(emb), ref_emb.numpy().transpose(0, 2, 1), atol=1e-6)
    np.testing.assert_allclose(np.array(model.decoder(emb)).transpose(0, 2, 1), audio, atol=1e-6)


def _stream(model: EncodecModel, codes: mx.array, chunk: int) -> np.ndarray:
    stream = EncodecStreamDecoder(model)
    parts = [np.array(stream.push(codes[:, :, i:i + chunk]))
             for i in range(0, codes.shape[2], chunk)]
    parts.append(np.array(stream.flush()))
    return np.concatenate(parts, axis=-1)


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_streaming_decode_equals_offline(pair, chunk):
    _, model, _ = pair
    codes = mx.array(np.random.default_rng(chunk).integers(0, 2048, (2, 4, 137)).astype(np.int32))
    ref = np.array(model.decode(codes))
    got = _stream(model, codes, chunk)
    assert got.shape == ref.shape
    snr = snr_db(ref, got)
    print(f"streaming chunk={chunk}: SNR {snr:.1f} dB, max abs diff {np.abs(got - ref).max():.2e}")
    assert snr >= 60.0


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 9])
def test_streaming_short_sequences(pair, frames):
    """Clips shorter than the held-back window come out entirely at flush, still exact."""
    _, model, _ = pair
    codes = mx.array(np.random.default_rng(frames).integers(0, 2048, (1, 4, frames)).astype(np.int32))
    ref = np.array(model.decode(codes))
    for chunk in (1, 2):
        assert snr_db(ref, _stream(model, codes, chunk)) >= 60.0


def test_streaming_holds_back_only_latency_frames(pair):
    _, model, _ = pair
    stream = EncodecStreamDecoder(model)
    # MusicGen's EnCodec: 25-frame blocks + 1 frame of conv-stack margin + conv0's 3 lookahead - 1.
    assert (stream.block_frames, stream.margin_left, stream.margin_right, stream.lookahead) == (25, 1, 1, 3)
    assert stream.latency_frames == 28
    codes = mx.array(np.random.default_rng(5).integers(0, 2048, (1, 4, 60)).astype(np.int32))
    out = stream.push(codes)
    assert out.shape == (1, 1, (60 - stream.latency_frames) * 640)
    assert stream.flush().shape == (1, 1, stream.latency_frames * 640)
    # flush() resets: the same object decodes a new stream from scratch.
    again = np.concatenate([np.array(stream.push(codes)), np.array(stream.flush())], axis=-1)
    np.testing.assert_allclose(again, np.array(model.decode(codes)), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Block decoding: the streamed audio does not depend on how the codes are split into pushes.


def _codes(seed: int, frames: int, batch: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 2048, (batch, 4, frames)).astype(np.int32))


def _push_pattern(model: EncodecModel, codes: mx.array, sizes: list[int],
                  block_frames: int | None = None) -> np.ndarray:
    """Push `codes` in pieces of `sizes` frames (the last piece takes the rest), then flush."""
    stream = model.stream_decoder(block_frames)
    parts, i = [], 0
    for n in sizes:
        parts.append(np.array(stream.push(codes[:, :, i:i + n])))
        i += n
    parts.append(np.array(stream.push(codes[:, :, i:])))
    parts.append(np.array(stream.flush()))
    return np.concatenate(parts, axis=-1)


def _random_sizes(rng: np.random.Generator, total: int, high: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(0, high + 1)))  # 0: empty pushes are allowed too
    return sizes


@pytest.mark.parametrize("block_frames", [None, 7])
@pytest.mark.parametrize("frames", [1, 5, 27, 29, 53, 137])  # tiny, around block edges, several blocks
def test_block_decode_is_independent_of_push_pattern(pair, frames, block_frames):
    _, model, _ = pair
    codes = _codes(frames, frames)
    ref = np.array(model.decode_blocks(codes, block_frames))
    assert ref.shape == (1, 1, frames * 640) and ref.dtype == np.float32
    assert np.array_equal(ref, _push_pattern(model, codes, [], block_frames))  # one push
    assert np.array_equal(ref, _push_pattern(model, codes, [1] * frames, block_frames))
    rng = np.random.default_rng(100 + frames)
    for high in (3, 11, 40):
        sizes = _random_sizes(rng, frames, high)
        got = _push_pattern(model, codes, sizes, block_frames)
        assert np.array_equal(ref, got), f"push sizes {sizes}: max diff {np.abs(got - ref).max():.2e}"
    # The same decoder object again after flush (it resets), pushed one frame at a time.
    stream = model.stream_decoder(block_frames)
    stream.push(codes[:, :, :3])
    stream.flush()
    again = [np.array(stream.push(codes[:, :, i:i + 1])) for i in range(frames)]
    assert np.array_equal(ref, np.concatenate(again + [np.array(stream.flush())], axis=-1))


@pytest.mark.parametrize("block_frames", [None, 4, 7, 50])
@pytest.mark.parametrize("frames", [1, 2, 4, 26, 27, 28, 31, 100, 137])
def test_block_decode_equals_decode(pair, frames, block_frames):
    """Same maths as the whole-sequence decode: the block margins are the exact receptive field."""
    _, model, _ = pair
    codes = _codes(frames + 1, frames)
    ref = np.array(model.decode(codes))
    got = np.array(model.decode_blocks(codes, block_frames))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5
    assert ref.std() > 1e-3  # random codebooks: the audio is not flat, so the check discriminates


def test_block_margins_are_tight(pair):
    """One frame less of conv-stack margin on either side changes the audio: the margins the
    decoder derives are its exact receptive field, not a guess."""
    import mlx_music.models.encodec as encodec

    _, model, _ = pair
    codes = _codes(8, 60)
    ref = np.array(model.decode(codes))
    stream = model.stream_decoder()
    left, right = stream.margin_left, stream.margin_right
    for cut in ((left - 1, right), (left, right - 1)):
        short = encodec.EncodecStreamDecoder(model)
        short.margin_left, short.margin_right = cut
        got = np.concatenate([np.array(short.push(codes)), np.array(short.flush())], axis=-1)
        assert np.abs(got - ref).max() > 1e-4


@pytest.mark.parametrize("block_frames", [None, 7])
def test_block_decode_latency(pair, block_frames):
    """After pushing n frames the audio returned so far covers max(0, n - latency_frames) frames
    (so at least n - latency_frames), one frame per push or in random pieces."""
    _, model, _ = pair
    codes = _codes(3, 120)
    rng = np.random.default_rng(4)
    for sizes in ([1] * 120, _random_sizes(rng, 120, 17)):
        stream = model.stream_decoder(block_frames)
        latency = stream.latency_frames
        pushed = covered = 0
        for n in sizes:
            n = min(n, 120 - pushed)
            out = stream.push(codes[:, :, pushed:pushed + n])
            pushed += n
            assert out.shape[-1] % 640 == 0
            covered += out.shape[-1] // 640
            assert covered >= pushed - latency
            assert covered == max(0, pushed - latency)
        assert covered + stream.flush().shape[-1] // 640 == 120
    assert model.stream_decoder(7).latency_frames == 7 + 1 + 3 - 1


def test_block_decode_batch_rows_are_independent(pair):
    _, model, _ = pair
    codes = _codes(6, 77, batch=2)
    both = _push_pattern(model, codes, [5, 30, 1, 20])
    assert both.shape == (2, 1, 77 * 640)
    for row in range(2):
        alone = np.array(model.decode_blocks(codes[row:row + 1]))
        assert np.abs(both[row:row + 1] - alone).max() <= 1e-6
    assert np.abs(both[0] - both[1]).max() > 1e-3


def test_block_decode_rejects_bad_block_size(pair):
    _, model, _ = pair
    for bad in (0, 3, 2.5, True):  # must exceed conv0's 3-frame left reach
        with pytest.raises(ValueError):
            model.stream_decoder(bad)


@pytest.mark.parametrize("batch,length,in_ch,out_ch,kernel,stride,padding", [
    (1, 9, 16, 8, 16, 8, 0),   # EnCodec's kernel = 2 * stride
    (2, 7, 12, 5, 10, 5, 0),
    (3, 5, 8, 4, 7, 3, 0),     # kernel not a multiple of the stride
    (2, 6, 8, 6, 3, 1, 1),     # stride 1, padding
    (1, 4, 4, 3, 2, 4, 0),     # kernel < stride: gaps between the steps
    (2, 11, 6, 7, 9, 2, 2),
    (1, 1, 5, 3, 8, 4, 1),     # a single input step
])
def test_conv_transpose1d_matmul_equals_mlx_op(batch, length, in_ch, out_ch, kernel, stride,
                                              padding):
    """The CPU matmul + overlap-add formulation is the MLX transposed convolution."""
    from mlx_music.models.encodec import conv_transpose1d_matmul

    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    x = mx.array(rng.standard_normal((batch, length, in_ch)).astype(np.float32))
    w = mx.array((rng.standard_normal((out_ch, kernel, in_ch))
                  / np.sqrt(in_ch * kernel)).astype(np.float32))
    ref = mx.conv_transpose1d(x, w, stride=stride, padding=padding)
    out = conv_transpose1d_matmul(x, w, stride, padding)
    assert out.shape == ref.shape == (batch, (length - 1) * stride + kernel - 2 * padding, out_ch)
    assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-5
    assert np.array(ref).std() > 0.1  # not a trivially zero comparison


def test_conv_transpose_layer_on_cpu_equals_mlx_layer():
    """EncodecConvTranspose1d on the CPU (matmul path, bias included) = the nn.ConvTranspose1d
    it holds (the path other devices use), trimmed the same way."""
    from mlx_music.models.encodec import EncodecConvTranspose1d

    assert mx.default_device().type == mx.cpu
    layer = EncodecConvTranspose1d(EncodecArgs(), 12, 6, kernel_size=10, stride=5)
    layer.conv.bias = mx.array(np.linspace(-1, 1, 6).astype(np.float32))
    x = mx.array(np.random.default_rng(3).standard_normal((2, 13, 12)).astype(np.float32))
    ref = layer.conv(x)[:, layer.trim_left:-layer.trim_right]
    out = layer(x)
    assert out.shape == ref.shape == (2, 13 * 5, 6)
    assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-5


@pytest.mark.parametrize("batch,length,in_ch,out_ch,kernel,stride,dilation", [
    (1, 20, 16, 8, 3, 1, 1),    # residual block convolution
    (2, 23, 8, 4, 3, 1, 2),     # dilated
    (1, 30, 6, 1, 7, 1, 1),     # the decoder's last convolution (-> 1 channel)
    (3, 17, 8, 6, 1, 1, 1),     # 1x1
    (2, 41, 4, 8, 16, 8, 1),    # an encoder downsampling stage (kernel = 2 * stride)
    (1, 19, 5, 7, 4, 3, 2),     # stride and dilation together
])
def test_conv1d_matmul_equals_mlx_op(batch, length, in_ch, out_ch, kernel, stride, dilation):
    """The CPU tap-wise matmul formulation is the MLX convolution."""
    from mlx_music.models.encodec import conv1d_matmul

    rng = np.random.default_rng(kernel * 100 + stride * 10 + dilation)
    x = mx.array(rng.standard_normal((batch, length, in_ch)).astype(np.float32))
    w = mx.array((rng.standard_normal((out_ch, kernel, in_ch))
                  / np.sqrt(in_ch * kernel)).astype(np.float32))
    ref = mx.conv1d(x, w, stride=stride, dilation=dilation)
    out = conv1d_matmul(x, w, stride, dilation)
    assert out.shape == ref.shape
    assert ref.shape[1] == (length - (kernel - 1) * dilation - 1) // stride + 1 > 1
    assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-5
    assert np.array(ref).std() > 0.1


def test_conv1d_layer_on_cpu_equals_mlx_layer():
    """EncodecConv1d on the CPU (matmul path, bias included) = its nn.Conv1d on the same padding."""
    from mlx_music.models.encodec import EncodecConv1d, _pad_time

    layer = EncodecConv1d(EncodecArgs(), 6, 5, kernel_size=4, stride=2, dilation=1)
    layer.conv.bias = mx.array(np.linspace(-1, 1, 5).astype(np.float32))
    x = mx.array(np.random.default_rng(4).standard_normal((2, 15, 6)).astype(np.float32))
    left, right = layer.padding(15)
    ref = layer.conv(_pad_time(x, left, right, "reflect"))
    out = layer(x)
    assert out.shape == ref.shape == (2, 8, 5)
    assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-5
