"""EnCodec (SEANet encoder/decoder + residual vector quantizer) in MLX, as MusicGen uses it.

The module tree reproduces the Hugging Face `EncodecModel` layer indices so converted checkpoints
load by name (see notes/SPEC.md): `encoder.layers.L...`, `decoder.layers.L...`,
`quantizer.layers.Q.codebook.embed`. Convolution weights arrive with weight norm already fused and
in MLX layout (out, k, in), for the transposed convolutions too.

Layout conventions:
- Public audio API is channels-first like PyTorch: `encode(audio (B, C, samples))`,
  `decode(codes (B, nq, frames)) -> (B, C, samples)`.
- Inside, MLX convolutions are channels-last, so `quantizer.decode` returns embeddings as
  (B, frames, codebook_dim) and `decoder` maps (B, frames, hidden) -> (B, samples, C).

`EncodecStreamDecoder` decodes codes chunk by chunk in fixed blocks aligned to absolute frame
positions, so its output does not depend on how the codes are split into pushes (bit-identical);
`EncodecModel.decode_blocks` is the same computation in one call. Both equal the whole-sequence
`decode` up to float rounding even though the decoder is non-causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class EncodecArgs:
    """`config.json["audio_encoder"]`; defaults are those of MusicGen's 32 kHz EnCodec."""

    sampling_rate: int = 32000
    audio_channels: int = 1
    num_filters: int = 64
    hidden_size: int = 128
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    num_residual_layers: int = 1
    num_lstm_layers: int = 2
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 4])
    compress: int = 2
    use_conv_shortcut: bool = False
    codebook_size: int = 2048
    codebook_dim: int = 128
    num_quantizers: int = 4
    pad_mode: str = "reflect"
    use_causal_conv: bool = False
    normalize: bool = False
    trim_right_ratio: float = 1.0
    frame_rate: int = 50

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "EncodecArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in config.items() if k in known})
        args.upsampling_ratios = [int(r) for r in args.upsampling_ratios]
        if args.normalize:
            # MusicGen never normalises; supporting it would change encode/decode signatures
            # (a per-item scale travels with the codes).
            raise ValueError("EnCodec with normalize=True is not supported")
        if args.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"unsupported pad_mode {args.pad_mode!r}")
        return args

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)


# ----------------------------------------------------------------------------------------------
# Padding helpers (time axis is axis 1: channels-last)


def _pad_time(x: mx.array, left: int, right: int, mode: str) -> mx.array:
    """Pad (B, T, C) along T. Reflect mode mirrors without repeating the edge sample.

    As in the reference, when the signal is too short to reflect (T <= pad) it is first extended
    with zeros on the right, reflected, and the extension dropped again.
    """
    if left == 0 and right == 0:
        return x
    if mode != "reflect":
        return mx.pad(x, [(0, 0), (left, right), (0, 0)])
    length = x.shape[1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = mx.pad(x, [(0, 0), (0, extra), (0, 0)])
        length += extra
    parts = []
    if left:
        parts.append(x[:, 1:left + 1][:, ::-1])  # x[left], ..., x[1]
    parts.append(x)
    if right:
        parts.append(x[:, length - 1 - right:length - 1][:, ::-1])  # x[T-2], ..., x[T-1-right]
    padded = mx.concatenate(parts, axis=1)
    return padded[:, :padded.shape[1] - extra] if extra else padded


def _on_cpu() -> bool:
    """True when MLX computes on the CPU (where its convolutions are slow, see below)."""
    return mx.default_device().type == mx.cpu


def conv1d_matmul(x: mx.array, weight: mx.array, stride: int = 1, dilation: int = 1
                  ) -> mx.array:
    """`mx.conv1d(x, weight, stride, dilation=dilation)` (no padding, one group) as one matmul
    per kernel tap, summed.

    x (B, T, in), weight (out, kernel, in) -> (B, (T - (kernel - 1) * dilation - 1) // stride + 1,
    out): output t = sum_j x[t * stride + j * dilation] @ weight[:, j].T.

    Why: MLX's CPU conv1d builds the (T, kernel * in) unfolded matrix first; tap-wise matmuls
    on strided views skip that copy and are 3-25x faster on EnCodec's shapes (the 64 -> 1 output
    convolution over 10 s: 0.34 s -> 0.013 s). Equal up to float rounding (tests/test_encodec.py).
    """
    _, length, _ = x.shape
    _, kernel, _ = weight.shape
    n = (length - (kernel - 1) * dilation - 1) // stride + 1
    y = None
    for j in range(kernel):
        start = j * dilation
        tap = x[:, start:start + (n - 1) * stride + 1:stride] @ weight[:, j].T
        y = tap if y is None else y + tap
    return y


def conv_transpose1d_matmul(x: mx.array, weight: mx.array, stride: int, padding: int = 0
                            ) -> mx.array:
    """`mx.conv_transpose1d(x, weight, stride, padding)` (dilation 1, one group) as one matmul
    and an overlap-add.

    x (B, T, in), weight (out, kernel, in) (MLX layout) -> (B, (T - 1) * stride + kernel -
    2 * padding, out). Input step t adds x[t] @ weight[:, j].T to output sample t * stride + j;
    the matmul computes every (t, j) product at once and the overlap-add sums the
    ceil(kernel / stride) phases that land on the same output samples.

    Why: MLX's CPU transposed convolution is ~30-100x slower than a BLAS matmul on EnCodec's
    shapes (8 s for one 10 s decoder stage on a 2-core x86 CPU, against 0.1-0.25 s this way).
    Equal to the MLX op up to float rounding (tests/test_encodec.py).
    """
    batch, length, in_ch = x.shape
    out_ch, kernel, _ = weight.shape
    phases = -(-kernel // stride)
    w = weight.transpose(2, 1, 0).reshape(in_ch, kernel * out_ch)
    z = (x.reshape(batch * length, in_ch) @ w).reshape(batch, length, kernel, out_ch)
    if phases * stride != kernel:
        z = mx.pad(z, [(0, 0), (0, 0), (0, phases * stride - kernel), (0, 0)])
    z = z.reshape(batch, length, phases, stride, out_ch)
    # Phase p of step t lands on output block t + p (blocks of `stride` samples).
    y = None
    for p in range(phases):
        zp = mx.pad(z[:, :, p], [(0, 0), (p, phases - 1 - p), (0, 0), (0, 0)])
        y = zp if y is None else y + zp
    y = y.reshape(batch, (length + phases - 1) * stride, out_ch)
    full = (length - 1) * stride + kernel
    return y[:, padding:full - padding]


class EncodecConv1d(nn.Module):
    """Conv1d with EnCodec's padding: output length = ceil(T / stride), no frames lost."""

    def __init__(self, args: EncodecArgs, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              dilation=dilation)
        self.causal = args.use_causal_conv
        self.pad_mode = args.pad_mode
        self.stride = stride
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        self.padding_total = self.effective_kernel - stride

    def extra_padding(self, length: int) -> int:
        """Right padding that makes the last window complete (so a partial frame still counts)."""
        n_frames = -(-(length - self.effective_kernel + self.padding_total) // self.stride)
        ideal = n_frames * self.stride + self.effective_kernel - self.padding_total
        return ideal - length

    def padding(self, length: int) -> tuple[int, int]:
        extra = self.extra_padding(length)
        if self.causal:
            return self.padding_total, extra
        # Odd totals put the extra sample on the left, as in the reference.
        right = self.padding_total // 2
        return self.padding_total - right, right + extra

    def __call__(self, x: mx.array) -> mx.array:
        left, right = self.padding(x.shape[1])
        return self.conv_padded(_pad_time(x, left, right, self.pad_mode))

    def conv_padded(self, x: mx.array) -> mx.array:
        """The bare convolution of an already padded (B, T, in) signal (one function for the
        offline and the streaming decoder, so both round alike)."""
        if _on_cpu():
            y = conv1d_matmul(x, self.conv.weight, self.conv.stride, self.conv.dilation)
            return y + self.conv.bias if "bias" in self.conv else y
        return self.conv(x)


class EncodecConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims the fixed kernel overhang: output length = T * stride."""

    def __init__(self, args: EncodecArgs, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        total = kernel_size - stride
        if args.use_causal_conv:
            right = math.ceil(total * args.trim_right_ratio)
        else:
            if args.trim_right_ratio != 1.0:
                raise ValueError("trim_right_ratio != 1.0 only makes sense for causal convolutions")
            right = total // 2
        self.trim_left = total - right
        self.trim_right = right

    def __call__(self, x: mx.array) -> mx.array:
        if _on_cpu():
            y = conv_transpose1d_matmul(x, self.conv.weight, self.conv.stride)
            if "bias" in self.conv:
                y = y + self.conv.bias
        else:
            y = self.conv(x)
        return y[:, self.trim_left:y.shape[1] - self.trim_right]


class ELU(nn.Module):
    """Parameter-free ELU kept as its own list entry so layer indices match the reference."""

    def __call__(self, x: mx.array) -> mx.array:
        return nn.elu(x)


class LSTMStack(nn.Module):
    """Stacked unidirectional LSTMs (PyTorch `nn.LSTM(num_layers=n)`), with explicit state."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.layers = [nn.LSTM(dim, dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array, state: list[tuple[mx.array, mx.array]] | None = None
                 ) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        """x: (B, T, dim); state: per layer (h, c) each (B, dim), or None for zeros."""
        new_state = []
        for i, lstm in enumerate(self.layers):
            h0, c0 = state[i] if state is not None else (None, None)
            hs, cs = lstm(x, hidden=h0, cell=c0)
            new_state.append((hs[:, -1], cs[:, -1]))
            x = hs
        return x, new_state


class EncodecLSTM(nn.Module):
    """LSTM over time with a skip connection around it: lstm(x) + x."""

    def __init__(self, args: EncodecArgs, dim: int):
        super().__init__()
        self.lstm = LSTMStack(dim, args.num_lstm_layers)

    def step(self, x: mx.array, state: list[tuple[mx.array, mx.array]] | None
             ) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        """Continue the sequence from `state`; used by the streaming decoder."""
        y, state = self.lstm(x, state)
        return y + x, state

    def __call__(self, x: mx.array) -> mx.array:
        return self.step(x, None)[0]


class EncodecResnetBlock(nn.Module):
    """SEANet residual block: ELU, dilated conv (dim -> dim/compress), ELU, 1x1 conv back."""

    def __init__(self, args: EncodecArgs, dim: int, dilations: tuple[int, int]):
        super().__init__()
        kernel_sizes = (args.residual_kernel_size, 1)
        hidden = dim // args.compress
        block: list[nn.Module] = []
        for i, (k, d) in enumerate(zip(kernel_sizes, dilations)):
            in_ch = dim if i == 0 else hidden
            out_ch = dim if i == len(kernel_sizes) - 1 else hidden
            block += [ELU(), EncodecConv1d(args, in_ch, out_ch, k, dilation=d)]
        self.block = block
        self.use_conv_shortcut = args.use_conv_shortcut
        if args.use_conv_shortcut:
            self.shortcut = EncodecConv1d(args, dim, dim, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        residual = self.shortcut(x) if self.use_conv_shortcut else x
        for layer in self.block:
            x = layer(x)
        return residual + x


class EncodecEncoder(nn.Module):
    """SEANet encoder: audio (B, samples, C) -> embeddings (B, frames, hidden_size)."""

    def __init__(self, args: EncodecArgs):
        super().__init__()
        layers: list[nn.Module] = [EncodecConv1d(args, args.audio_channels, args.num_filters,
                                                 args.kernel_size)]
        scale = 1
        for ratio in reversed(args.upsampling_ratios):
            dim = scale * args.num_filters
            for j in range(args.num_residual_layers):
                layers.append(EncodecResnetBlock(args, dim, (args.dilation_growth_rate ** j, 1)))
            layers += [ELU(), EncodecConv1d(args, dim, dim * 2, kernel_size=ratio * 2,
                                            stride=ratio)]
            scale *= 2
        dim = scale * args.num_filters
        layers += [EncodecLSTM(args, dim), ELU(),
                   EncodecConv1d(args, dim, args.hidden_size, args.last_kernel_size)]
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecDecoder(nn.Module):
    """SEANet decoder: embeddings (B, frames, hidden_size) -> audio (B, frames * hop, C).

    layers[0] is a conv, layers[1] the LSTM; everything after is a pure (non-causal) conv stack,
    which is what lets the streaming decoder recompute it on a short window.
    """

    def __init__(self, args: EncodecArgs):
        super().__init__()
        scale = 2 ** len(args.upsampling_ratios)
        dim = scale * args.num_filters
        layers: list[nn.Module] = [EncodecConv1d(args, args.hidden_size, dim, args.kernel_size),
                                   EncodecLSTM(args, dim)]
        for ratio in args.upsampling_ratios:
            dim = scale * args.num_filters
            layers += [ELU(), EncodecConvTranspose1d(args, dim, dim // 2, kernel_size=ratio * 2,
                                                     stride=ratio)]
            for j in range(args.num_residual_layers):
                layers.append(EncodecResnetBlock(args, dim // 2,
                                                 (args.dilation_growth_rate ** j, 1)))
            scale //= 2
        layers += [ELU(), EncodecConv1d(args, args.num_filters, args.audio_channels,
                                        args.last_kernel_size)]
        self.layers = layers

    def upsample(self, x: mx.array) -> mx.array:
        """The conv stack after the LSTM: (B, frames, dim) -> (B, frames * hop, C)."""
        for layer in self.layers[2:]:
            x = layer(x)
        return x

    def __call__(self, x: mx.array) -> mx.array:
        return self.upsample(self.layers[1](self.layers[0](x)))


# ----------------------------------------------------------------------------------------------
# Residual vector quantizer


class EuclideanCodebook(nn.Module):
    def __init__(self, args: EncodecArgs):
        super().__init__()
        self.embed = mx.zeros((args.codebook_size, args.codebook_dim))

    def encode(self, x: mx.array) -> mx.array:
        """Index of the nearest codeword (L2) for each vector of x (..., dim)."""
        embed = self.embed.astype(x.dtype)
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2, written out in the reference's order so ties
        # and rounding behave the same.
        dist = -((x * x).sum(-1, keepdims=True) - 2 * (x @ embed.T) + (embed * embed).sum(-1))
        return mx.argmax(dist, axis=-1).astype(mx.int32)

    def decode(self, indices: mx.array) -> mx.array:
        return self.embed[indices]


class VectorQuantization(nn.Module):
    def __init__(self, args: EncodecArgs):
        super().__init__()
        self.codebook = EuclideanCodebook(args)


class ResidualVectorQuantizer(nn.Module):
    """Each level quantizes what the previous levels left unexplained."""

    def __init__(self, args: EncodecArgs):
        super().__init__()
        self.num_quantizers = args.num_quantizers
        self.layers = [VectorQuantization(args) for _ in range(args.num_quantizers)]

    def encode(self, embeddings: mx.array, num_quantizers: int | None = None) -> mx.array:
        """embeddings (B, frames, dim) -> codes (B, nq, frames) int32."""
        nq = self.num_quantizers if num_quantizers is None else num_quantizers
        residual = embeddings
        codes = []
        for layer in self.layers[:nq]:
            indices = layer.codebook.encode(residual)
            residual = residual - layer.codebook.decode(indices)
            codes.append(indices)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        """codes (B, nq, frames) -> summed codeword embeddings (B, frames, dim) (channels-last)."""
        out = self.layers[0].codebook.decode(codes[:, 0])
        for q in range(1, codes.shape[1]):
            out = out + self.layers[q].codebook.decode(codes[:, q])
        return out


# ----------------------------------------------------------------------------------------------


class EncodecModel(nn.Module):
    def __init__(self, args: EncodecArgs):
        super().__init__()
        self.args = args
        self.encoder = EncodecEncoder(args)
        self.decoder = EncodecDecoder(args)
        self.quantizer = ResidualVectorQuantizer(args)

    @property
    def hop_length(self) -> int:
        return self.args.hop_length

    def encode(self, audio: mx.array, num_quantizers: int | None = None) -> mx.array:
        """audio (B, channels, samples) float -> codes (B, num_quantizers, frames) int32.

        Matches transformers' `EncodecModel.encode(x)` at MusicGen's default bandwidth (all
        `num_quantizers` levels); frames = ceil(samples / hop) stage by stage.
        """
        if audio.ndim != 3 or audio.shape[1] != self.args.audio_channels:
            raise ValueError(f"expected audio (B, {self.args.audio_channels}, samples), "
                             f"got {audio.shape}")
        embeddings = self.encoder(audio.transpose(0, 2, 1))
        return self.quantizer.encode(embeddings, num_quantizers)

    def decode(self, codes: mx.array) -> mx.array:
        """codes (B, nq, frames) int -> audio (B, channels, frames * hop)."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes (B, nq, frames), got {codes.shape}")
        audio = self.decoder(self.quantizer.decode(codes))
        return audio.transpose(0, 2, 1)

    def stream_decoder(self, block_frames: int | None = None) -> "EncodecStreamDecoder":
        """Incremental decoder (see `EncodecStreamDecoder`); `block_frames` None: the default."""
        return EncodecStreamDecoder(self, DEFAULT_BLOCK_FRAMES if block_frames is None
                                    else block_frames)

    def decode_blocks(self, codes: mx.array, block_frames: int | None = None) -> mx.array:
        """codes (B, nq, frames) -> audio (B, channels, frames * hop), block by block.

        Exactly what `stream_decoder()` returns for these codes however they are pushed
        (bit-identical), so offline output can match streamed output sample for sample. Same
        maths as `decode`, which it equals up to float rounding.
        """
        if codes.ndim != 3:
            raise ValueError(f"expected codes (B, nq, frames), got {codes.shape}")
        decoder = self.stream_decoder(block_frames)
        return mx.concatenate([decoder.push(codes), decoder.flush()], axis=-1)


# ----------------------------------------------------------------------------------------------
# Streaming decode

DEFAULT_BLOCK_FRAMES = 25  # half a second at MusicGen's 50 Hz; see EncodecStreamDecoder


def _input_span(layer: nn.Module, lo: int, hi: int) -> tuple[int, int]:
    """Inclusive input index range that output samples [lo, hi] of `layer` depend on.

    Padding is ignored: indices outside the signal are where padding (or a window edge) would be
    read instead of real neighbours.
    """
    if isinstance(layer, ELU):
        return lo, hi
    if isinstance(layer, EncodecConv1d):
        left = layer.padding(10 ** 6)[0]  # the left padding does not depend on the length
        return lo * layer.stride - left, hi * layer.stride - left + layer.effective_kernel - 1
    if isinstance(layer, EncodecConvTranspose1d):
        stride, kernel = layer.conv.stride, layer.conv.weight.shape[1]
        if layer.conv.padding or layer.conv.dilation != 1:
            raise ValueError("unsupported transposed convolution for streaming")
        # Untrimmed output p = j + trim_left receives input i when 0 <= p - i * stride < kernel.
        return (-(-(lo + layer.trim_left - kernel + 1) // stride),
                (hi + layer.trim_left) // stride)
    if isinstance(layer, EncodecResnetBlock):
        a, b = lo, hi
        for sub in reversed(layer.block):
            a, b = _input_span(sub, a, b)
        ra, rb = _input_span(layer.shortcut, lo, hi) if layer.use_conv_shortcut else (lo, hi)
        return min(a, ra), max(b, rb)
    raise TypeError(f"no receptive-field rule for {type(layer).__name__}")


def _upsample_margins(decoder: EncodecDecoder, hop: int) -> tuple[int, int]:
    """(left, right): LSTM-output frames that `decoder.upsample` reads around a block of frames.

    Exact receptive field of the conv stack, walked from the output back to the frame rate: the
    audio of frames [f0, f1) depends only on frames [f0 - left, f1 + right). A window with those
    margins therefore gives that audio exactly (window-edge padding never reaches it). MusicGen's
    decoder gives (1, 1).
    """
    start = 1000  # any frame away from the signal start; the answer does not depend on it
    lo, hi = start * hop, (start + 1) * hop - 1
    for layer in reversed(decoder.layers[2:]):
        lo, hi = _input_span(layer, lo, hi)
    return max(0, start - lo), max(0, hi - start)


def _padded_indices(length: int, left: int, right: int, mode: str) -> mx.array:
    """Source index of every sample of `_pad_time(x, left, right, mode)` for x of `length`
    samples (-1 where the padding is a zero), by running `_pad_time` itself on the indices."""
    idx = mx.arange(1, length + 1, dtype=mx.int32).reshape(1, length, 1)
    return _pad_time(idx, left, right, mode).reshape(-1) - 1


class EncodecStreamDecoder:
    """Decode codes incrementally in fixed blocks; the audio does not depend on how codes arrive.

    The decoder is conv0 -> LSTM -> conv stack: conv0 is non-causal (`lookahead` future frames),
    the LSTM is causal (its (h, c) is carried), and the conv stack reads `margin_left` /
    `margin_right` frames of LSTM output around any span (its exact receptive field).

    Everything runs on blocks of `block_frames` frames aligned to absolute frame positions, so
    every block is computed from exactly the same input slice (same values, same shapes) however
    the codes were split into pushes:

    - audio block b is frames [b*B, (b+1)*B); the conv stack runs on LSTM outputs
      [b*B - margin_left, (b+1)*B + margin_right) (clipped at the signal start, where the offline
      padding applies) and keeps the middle;
    - conv0 + LSTM run on blocks ending where audio blocks need them: [0, B + margin_right), then
      [k*B + margin_right, (k+1)*B + margin_right); conv0 reads `lookahead` frames past the block;
    - `flush()` finishes the rest (the last conv0 + LSTM block and the last audio block, both
      shorter than a block plus margins) with the end-of-signal padding of the offline decode.
      Their extent depends only on the total number of frames.

    Hence any sequence of pushes followed by `flush()` gives bit-identical audio (also
    `EncodecModel.decode_blocks`), equal to `EncodecModel.decode` up to float rounding.

    Latency: audio block b is ready once (b+1)*B + margin_right + lookahead frames have been
    pushed. The decoder evens this out to a fixed delay: after pushing n frames in total, the
    audio returned so far covers exactly max(0, n - latency_frames) frames, where
    `latency_frames = block_frames + margin_right + lookahead - 1` (MusicGen's EnCodec with the
    default 25-frame blocks: 25 + 1 + 3 - 1 = 28 frames, 0.56 s). `flush()` returns the rest.
    Cost: the conv stack recomputes margin_left + margin_right frames per block (2 of 25 here).

    Codes are (B, nq, n); rows of a batch are decoded independently.
    """

    def __init__(self, model: EncodecModel, block_frames: int = DEFAULT_BLOCK_FRAMES):
        self.model = model
        self.hop = model.hop_length
        conv0 = model.decoder.layers[0]
        if conv0.stride != 1:
            raise ValueError("streaming needs a stride-1 first decoder convolution")
        self.conv0_left, self.lookahead = conv0.padding(10 ** 6)  # stride 1: no extra padding
        self.margin_left, self.margin_right = _upsample_margins(model.decoder, self.hop)
        if isinstance(block_frames, bool) or not isinstance(block_frames, int) \
                or block_frames <= self.conv0_left:
            # A first block at least that long always holds the frames conv0's left reflection
            # reads, so it never depends on the total length.
            raise ValueError(f"block_frames must be an int > {self.conv0_left}, "
                             f"got {block_frames!r}")
        self.block_frames = block_frames
        self.reset()

    def reset(self) -> None:
        self._emb: mx.array | None = None  # codeword embeddings, from absolute frame _emb_start
        self._emb_start = 0
        self._n_emb = 0  # frames pushed
        self._lstm_state: list[tuple[mx.array, mx.array]] | None = None
        self._n_lstm = 0  # frames through conv0 + LSTM (a conv0/LSTM block boundary)
        self._lstm_out: mx.array | None = None  # LSTM outputs, from absolute frame _out_start
        self._out_start = 0
        self._n_audio = 0  # frames whose audio is computed (an audio block boundary)
        self._audio: list[mx.array] = []  # computed, not yet returned (B, samples, C) pieces
        self._n_emitted = 0  # frames whose audio has been returned
        self._batch = 1
        self._channels = self.model.args.audio_channels

    @property
    def latency_frames(self) -> int:
        """Frames held back: after pushing n frames the output covers max(0, n - latency_frames)."""
        return self.block_frames + self.margin_right + self.lookahead - 1

    def push(self, codes: mx.array) -> mx.array:
        """codes (B, nq, n) -> the newly final audio (B, channels, k * hop), k >= 0."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes (B, nq, frames), got {codes.shape}")
        if self._emb is not None and codes.shape[0] != self._batch:
            raise ValueError(f"batch changed mid-stream: {self._batch} -> {codes.shape[0]}")
        self._batch = codes.shape[0]
        if codes.shape[2] > 0:
            emb = self.model.quantizer.decode(codes)
            self._emb = emb if self._emb is None else mx.concatenate([self._emb, emb], axis=1)
            self._n_emb += codes.shape[2]
        return self._advance(final=False)

    def flush(self) -> mx.array:
        """Emit the held-back tail (using end-of-signal padding) and reset for a new stream."""
        audio = self._advance(final=True)
        self.reset()
        return audio

    # -- blocks ----------------------------------------------------------------------------------

    def _lstm_block_end(self) -> int:
        """End of the conv0 + LSTM block that starts at `_n_lstm`."""
        if self._n_lstm == 0:
            return self.block_frames + self.margin_right
        return self._n_lstm + self.block_frames

    def _conv0_lstm(self, start: int, end: int) -> None:
        """conv0 + LSTM for frames [start, end) (end <= pushed frames: at flush, the signal end)."""
        conv0 = self.model.decoder.layers[0]
        lo, hi = start - self.conv0_left, end + self.lookahead  # conv0 input frames
        if lo >= 0 and hi <= self._n_emb:
            window = self._emb[:, lo - self._emb_start:hi - self._emb_start]
        else:
            # At a true edge: the same padded samples the offline decode builds. Before flush,
            # only the start (hi <= _n_emb), where the padding reads frames < block_frames.
            idx = _padded_indices(self._n_emb, self.conv0_left, self.lookahead, conv0.pad_mode)
            idx = idx[start:end + self.conv0_left + self.lookahead]
            valid = idx >= 0
            local = mx.maximum(idx, self._emb_start) - self._emb_start
            window = mx.where(valid[None, :, None], mx.take(self._emb, local, axis=1), 0.0)
        h = conv0.conv_padded(window)
        y, self._lstm_state = self.model.decoder.layers[1].step(h, self._lstm_state)
        self._lstm_out = y if self._lstm_out is None else mx.concatenate(
            [self._lstm_out, y], axis=1)
        self._n_lstm = end
        # conv0 of the next block reads from end - conv0_left; the final padding reflects at most
        # lookahead frames back from the end (kept generously).
        keep = max(self._emb_start, end - self.conv0_left - self.lookahead - 1, 0)
        self._emb = self._emb[:, keep - self._emb_start:]
        self._emb_start = keep

    def _upsample(self, start: int, end: int) -> None:
        """Audio for frames [start, end), from LSTM outputs with the conv stack's margins."""
        lo = max(0, start - self.margin_left)
        hi = min(self._n_lstm, end + self.margin_right)
        window = self._lstm_out[:, lo - self._out_start:hi - self._out_start]
        audio = self.model.decoder.upsample(window)
        self._audio.append(audio[:, (start - lo) * self.hop:(end - lo) * self.hop])
        self._n_audio = end
        keep = max(self._out_start, end - self.margin_left)
        self._lstm_out = self._lstm_out[:, keep - self._out_start:]
        self._out_start = keep

    def _advance(self, final: bool) -> mx.array:
        total = self._n_emb
        # 1) conv0 + LSTM on every whole block whose conv0 window has arrived; at flush, the rest.
        while self._lstm_block_end() + self.lookahead <= total:
            self._conv0_lstm(self._n_lstm, self._lstm_block_end())
        if final and self._n_lstm < total:
            self._conv0_lstm(self._n_lstm, total)
        # 2) conv stack on every whole audio block whose margin is through the LSTM; at flush,
        #    the rest.
        while self._n_audio + self.block_frames + self.margin_right <= self._n_lstm:
            self._upsample(self._n_audio, self._n_audio + self.block_frames)
        if final and self._n_audio < total:
            self._upsample(self._n_audio, total)
        # 3) return audio up to a fixed delay behind the pushed frames (everything at flush).
        target = total if final else max(self._n_emitted, total - self.latency_frames)
        assert target <= self._n_audio, "block schedule fell behind latency_frames"
        n = (target - self._n_emitted) * self.hop
        pending = mx.concatenate(self._audio, axis=1) if len(self._audio) > 1 else (
            self._audio[0] if self._audio else mx.zeros((self._batch, 0, self._channels)))
        out, rest = pending[:, :n], pending[:, n:]
        self._audio = [rest] if rest.shape[1] else []
        self._n_emitted = target
        to_eval = [out, *self._audio]
        if not final:
            to_eval += [a for a in (self._emb, self._lstm_out) if a is not None]
            to_eval += [a for s in (self._lstm_state or []) for a in s]
        mx.eval(*to_eval)
        return out.transpose(0, 2, 1)
