"""Numeric parity of mlx_models (T5, decoder, MusicGen) against transformers on tiny fp32 models.

Each architecture is built with tests/tiny_models.py, written as a hub folder, converted with
converters.convert (SPEC layout) and loaded into mlx_models.musicgen.MusicGen.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_music.converters.convert import convert_checkpoint  # noqa: E402
from mlx_music.models.musicgen import MusicGen  # noqa: E402
from mlx_music.models.musicgen_decoder import sinusoidal_positions  # noqa: E402
from tests.tiny_models import build_model, write_hub_folder  # noqa: E402

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def load_mlx_folder(folder: Path) -> MusicGen:
    cfg = json.loads((folder / "config.json").read_text())
    model = MusicGen(cfg)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weights: dict[str, mx.array] = {}
    for name in sorted(set(index["weight_map"].values())):
        weights.update(mx.load(str(folder / name)))
    model.load_weights(weights)
    return model


_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (transformers model, MLX MusicGen) built lazily, once per module."""

    def get(arch: str):
        if arch not in _CACHE:
            hf = build_model(arch)
            root = tmp_path_factory.mktemp(arch)
            convert_checkpoint(write_hub_folder(hf, root / "hf"), root / "mlx")
            _CACHE[arch] = (hf, load_mlx_folder(root / "mlx"))
        return _CACHE[arch]

    yield get
    _CACHE.clear()


def _inputs(hf, batch: int = 2, text_len: int = 7, frames: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = hf.decoder.config.num_codebooks
    ids = torch.randint(2, 99, (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[-1, text_len - 3:] = 0  # the last prompt is shorter (right padding)
    codes = torch.randint(0, 2049, (batch, K, frames), generator=g)
    chroma = None
    if hf.config.model_type == "musicgen_melody":
        bins = torch.randint(0, 12, (batch, 5), generator=g)
        chroma = torch.nn.functional.one_hot(bins, 12).float()
    return ids, mask, codes, chroma


def _hf_logits(hf, ids, mask, codes, chroma=None) -> np.ndarray:
    B, K, T = codes.shape
    kw = {"input_features": chroma} if chroma is not None else {}
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=codes.reshape(B * K, T), **kw)
    return out.logits.reshape(B, K, -1, out.logits.shape[-1])[:, :, -T:].numpy()  # melody: drop prefix


def _mx(t) -> mx.array | None:
    return None if t is None else mx.array(t.numpy())


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())



def test_t5_hidden_states_match(models):
    hf, model = models("mono")
    ids, mask, _, _ = _inputs(hf, text_len=40)  # longer than max_distance: log buckets used
    with torch.no_grad():
        ref = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    out = np.array(model.text_encoder(_mx(ids), _mx(mask)))
    valid = mask.numpy().astype(bool)
    assert _maxdiff(out[valid], ref[valid]) <= ATOL


@pytest.mark.parametrize("arch", ["mono", "stereo", "melody", "stereo-melody"])
def test_decoder_logits_match(models, arch):
    hf, model = models(arch)
    ids, mask, codes, chroma = _inputs(hf)
    ref = _hf_logits(hf, ids, mask, codes, chroma)
    states, m = model.encode_text(_mx(ids), _mx(mask))
    out = model(_mx(codes), states, m, chroma=_mx(chroma))
    assert out.shape == ref.shape
    assert _maxdiff(out, ref) <= ATOL


def test_melody_null_chroma_matches_reference_default(models):
    hf, model = models("melody")
    ids, mask, codes, _ = _inputs(hf)
    ref = _hf_logits(hf, ids, mask, codes)  # no input_features: reference uses one-hot bin 0
    states, m = model.encode_text(_mx(ids), _mx(mask))
    assert _maxdiff(model(_mx(codes), states, m, chroma=None), ref) <= ATOL


@pytest.mark.parametrize("arch", ["mono", "stereo", "melody"])
def test_kv_cache_steps_equal_full_forward(models, arch):
    hf, model = models(arch)
    ids, mask, codes, chroma = _inputs(hf)
    states, m = model.encode_text(_mx(ids), _mx(mask))
    c = _mx(codes)
    full = np.array(model(c, states, m, chroma=_mx(chroma)))

    prefix = model.chroma_length + ids.shape[1] if model.is_melody else 0
    T = codes.shape[2]
    for compiled in (False, True):
        cache = model.make_cache(c.shape[0], max_len=prefix + T + 5)  # slack: masked slots
        outs = [model.prefill(c[:, :, :3], cache, text_states=states, text_mask=m,
                              chroma=_mx(chroma))]
        step = ((mx.compile(lambda x: model.step(x, cache), inputs=cache.state, outputs=cache.state))
                if compiled else (lambda x: model.step(x, cache)))
        for t in range(3, T):
            outs.append(step(c[:, :, t:t + 1]))
        inc = np.concatenate([np.array(o) for o in outs], axis=2)
        assert _maxdiff(inc, full) <= ATOL, f"compiled={compiled}"
        assert int(cache.offset) == prefix + T


def test_single_token_prefill_then_steps(models):
    # The generation loop starts from one BOS frame: prefill T=1, then T=1 steps.
    hf, model = models("mono")
    ids, mask, codes, _ = _inputs(hf, frames=4)
    ref = _hf_logits(hf, ids, mask, codes)
    states, m = model.encode_text(_mx(ids), _mx(mask))
    c = _mx(codes)
    cache = model.make_cache(c.shape[0], max_len=8)
    outs = [model.prefill(c[:, :, :1], cache, text_states=states, text_mask=m)]
    outs += [model.step(c[:, :, t:t + 1], cache) for t in range(1, 4)]
    assert _maxdiff(np.concatenate([np.array(o) for o in outs], axis=2), ref) <= ATOL


@pytest.mark.parametrize("arch", ["mono", "stereo"])
def test_padded_batch_rows_equal_single_runs(models, arch):
    hf, model = models(arch)
    g = torch.Generator().manual_seed(3)
    lengths = [7, 4, 2]
    K = hf.decoder.config.num_codebooks
    ids = torch.randint(2, 99, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    codes = _mx(torch.randint(0, 2049, (len(lengths), K, 5), generator=g))
    states, m = model.encode_text(_mx(ids), _mx(mask))
    cache = model.make_cache(len(lengths), max_len=8)
    batched = [model.prefill(codes[:, :, :2], cache, text_states=states, text_mask=m)]
    batched += [model.step(codes[:, :, t:t + 1], cache) for t in range(2, 5)]
    batched = np.concatenate([np.array(o) for o in batched], axis=2)
    for i, n in enumerate(lengths):
        s, sm = model.encode_text(_mx(ids[i:i + 1, :n]), _mx(mask[i:i + 1, :n]))
        single = model(codes[i:i + 1], s, sm)
        assert _maxdiff(batched[i:i + 1], single) <= ATOL, f"row {i}"


def test_null_condition_row_matches_reference(models):
    # Classifier-free guidance: a row whose text mask is all zero. The reference still produces
    # finite logits (zero cross-attention output), and so must we, cached or not.
    hf, model = models("mono")
    ids, mask, codes, _ = _inputs(hf)
    mask[1] = 0
    ref = _hf_logits(hf, ids, mask, codes)
    assert np.isfinite(ref).all()
    states, m = model.encode_text(_mx(ids), _mx(mask))
    assert _maxdiff(model(_mx(codes), states, m), ref) <= ATOL
    cache = model.make_cache(2, max_len=codes.shape[2])
    out = model.prefill(_mx(codes), cache, text_states=states, text_mask=m)
    assert _maxdiff(out, ref) <= ATOL


def test_load_weights_names_bad_keys(models):
    _, model = models("mono")
    from mlx.utils import tree_flatten

    model.unfuse()  # checkpoint layout: the names load_weights checks
    weights = dict(tree_flatten(model.parameters()))
    w = dict(weights)
    w.pop("decoder.layer_norm.bias")
    w["decoder.bogus.weight"] = mx.zeros((1,))
    w["enc_to_dec_proj.weight"] = mx.zeros((3, 3))
    with pytest.raises(ValueError) as e:
        model.load_weights(w)
    assert not model.decoder.fused  # it was unfused when called
    msg = str(e.value)
    assert "decoder.layer_norm.bias" in msg and "missing" in msg
    assert "decoder.bogus.weight" in msg and "unexpected" in msg
    assert "enc_to_dec_proj.weight" in msg and "mis-shaped" in msg
    model.load_weights(weights)  # restore (load_weights unfuses first, then fuses again)
    assert model.decoder.fused


def _tiny_config(cross_attention: bool = True, K: int = 4) -> dict:
    return {"model_type": "musicgen" if cross_attention else "musicgen_melody",
            "text_encoder": {"vocab_size": 99, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
                             "num_heads": 4, "relative_attention_num_buckets": 8,
                             "relative_attention_max_distance": 16},
            "decoder": {"vocab_size": 2048, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "ffn_dim": 128,
                        "num_codebooks": K, "cross_attention": cross_attention},
            "melody": {"num_chroma": 12, "chroma_length": 6},
            "audio_encoder": {"audio_channels": 1, "num_filters": 2, "hidden_size": 16, "num_residual_layers": 1,
                              "num_lstm_layers": 2, "upsampling_ratios": [8, 5, 4, 4], "compress": 2,
                              "codebook_size": 2048, "codebook_dim": 16, "num_quantizers": 4}}


def _random_model(cross_attention: bool = True, quantize: bool = False) -> MusicGen:
    """A tiny MusicGen with checkpoint-layout random weights loaded through load_weights."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = MusicGen(_tiny_config(cross_attention))
    if quantize:  # the runtime's loader: nn.quantize on checkpoint module paths, then load_weights
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda path, m: path.startswith("decoder.") and hasattr(m, "to_quantized"))
    weights = {k: mx.random.normal(v.shape).astype(v.dtype) * 0.2 if v.dtype != mx.uint32 else v
               for k, v in tree_flatten(model.parameters())}
    return model.load_weights(weights)


def test_constructed_model_has_checkpoint_layout_and_load_fuses():
    from mlx.utils import tree_flatten

    cfg = _tiny_config()
    names = {k for k, _ in tree_flatten(MusicGen(cfg).parameters())}
    assert {"decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.1.encoder_attn.v_proj.weight",
            "decoder.embed_tokens.3.weight", "decoder.lm_heads.0.weight"} <= names
    model = _random_model()
    fused = dict(tree_flatten(model.parameters()))
    assert fused["decoder.layers.0.self_attn.qkv_proj.weight"].shape == (192, 64)
    assert fused["decoder.layers.0.encoder_attn.kv_proj.weight"].shape == (128, 64)
    assert fused["decoder.layers.0.encoder_attn.q_proj.weight"].shape == (64, 64)
    assert fused["decoder.embed.weight"].shape == (4 * 2049, 64)
    assert fused["decoder.lm_head.weight"].shape == (4 * 2048, 64)
    assert not any(k.startswith(("decoder.lm_heads.", "decoder.embed_tokens.")) or "self_attn.q_proj" in k
                   for k in fused)
    with pytest.raises(RuntimeError, match="fuse"):
        MusicGen(cfg)(mx.zeros((1, 4, 2), dtype=mx.int32), mx.zeros((1, 3, 64)), mx.ones((1, 3)))


@pytest.mark.parametrize("quantize", [False, True])
def test_fused_equals_checkpoint_modules(quantize):
    """The fused forward equals one computed from the checkpoint-layout modules (unfuse)."""
    import mlx.nn as nn

    model = _random_model(quantize=quantize)
    dec = model.decoder
    if quantize:
        assert isinstance(dec.lm_head, nn.QuantizedLinear) and isinstance(dec.embed, nn.QuantizedEmbedding)
        assert isinstance(dec.layers[0].self_attn.qkv_proj, nn.QuantizedLinear)
    codes = mx.random.randint(0, 2049, (2, 4, 5))
    states = mx.random.normal((2, 3, 64))
    fused_logits = model(codes, states, mx.ones((2, 3)))
    model.unfuse()
    if quantize:
        assert isinstance(dec.lm_heads[2], nn.QuantizedLinear) and isinstance(dec.embed_tokens[0], nn.QuantizedEmbedding)
    # Reference forward through the checkpoint modules, one projection at a time.
    x = sum(dec.embed_tokens[k](codes[:, k]) for k in range(4))
    x = x + sinusoidal_positions(mx.arange(5), 64)
    causal = nn.MultiHeadAttention.create_additive_causal_mask(5)
    for layer in dec.layers:
        a, c = layer.self_attn, layer.encoder_attn
        heads = lambda t: t.reshape(2, t.shape[1], 4, -1).transpose(0, 2, 1, 3)
        h = layer.self_attn_layer_norm(x)
        o = mx.fast.scaled_dot_product_attention(heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h)),
                                                 scale=a.scale, mask=causal)
        x = x + a.out_proj(o.transpose(0, 2, 1, 3).reshape(2, 5, 64))
        h = layer.encoder_attn_layer_norm(x)
        o = mx.fast.scaled_dot_product_attention(heads(c.q_proj(h)), heads(c.k_proj(states)),
                                                 heads(c.v_proj(states)), scale=c.scale)
        x = x + c.out_proj(o.transpose(0, 2, 1, 3).reshape(2, 5, 64))
        x = x + layer.fc2(nn.gelu(layer.fc1(layer.final_layer_norm(x))))
    x = dec.layer_norm(x)
    ref = mx.stack([head(x) for head in dec.lm_heads], axis=1)
    assert _maxdiff(fused_logits, ref) <= ATOL
    model.fuse()
    assert _maxdiff(model(codes, states, mx.ones((2, 3))), fused_logits) == 0.0


@pytest.mark.parametrize("cross_attention", [True, False])
def test_compiled_step_equals_eager_step(cross_attention):
    """The runtime's pattern: make_cache, prefill, then mx.compile(step, inputs/outputs=cache.state),
    reusing the cache by resetting its offset. 20 compiled steps give the eager logits exactly."""
    model = _random_model(cross_attention)
    B, K, steps = 2, 4, 20
    codes = mx.random.randint(0, 2049, (B, K, steps + 1))
    text = mx.random.normal((B, 3, 64))
    mask = mx.array([[1, 1, 1], [1, 0, 0]])
    prefix = 0 if cross_attention else model.chroma_length + 3
    cache = model.make_cache(B, prefix + steps + 4, mx.float32)
    assert len(cache.layers) == 2 and cache.layers[0].state["kv"].shape == (2, B, 4, prefix + steps + 4, 16)
    compiled = mx.compile(lambda c: model.step(c, cache), inputs=cache.state, outputs=cache.state)
    runs = []
    for use_compiled in (False, True, True):  # the second compiled run reuses the cache and trace
        cache.offset = mx.array(0, dtype=mx.int32)
        outs = [model.prefill(codes[:, :, :1], cache, text_states=text, text_mask=mask)]
        for t in range(1, steps + 1):
            c = codes[:, :, t:t + 1]
            outs.append(compiled(c) if use_compiled else model.step(c, cache))
        assert int(cache.offset) == prefix + steps + 1
        runs.append(np.concatenate([np.array(o) for o in outs], axis=2))
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


def test_dense_copies_of_quantized_linears():
    """Quantized linears' dequantized copies (the CUDA route for >= DENSE_ROWS_CUDA rows): not
    made on CPU by default; when added, inputs of that many rows use them (the packed result to
    float rounding), fewer rows keep the packed matmul; the parameters are unchanged."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_music.models import musicgen_decoder as md

    model = _random_model(quantize=True)
    dec = model.decoder
    rows = md.DENSE_ROWS_CUDA
    dec.make_cache(rows, 8)
    assert getattr(dec.lm_head, "_dense", None) is None  # CPU: never made implicitly
    names = [k for k, _ in tree_flatten(model.parameters())]
    quantized = sum(isinstance(m, nn.QuantizedLinear) for _, m in dec.named_modules())
    assert dec.add_dense_copies() == quantized > 0 and dec.add_dense_copies() == 0
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    head = dec.lm_head
    for n in (rows, rows - 1):
        x = mx.random.normal((n, 1, 64))
        packed = head(x.reshape(n, 64)).reshape(n, 1, -1)
        assert _maxdiff(md._linear(head, x), packed) <= 1e-5 * float(mx.abs(packed).max())
    # Which path ran: zero the copy; only the call with enough rows sees it, in the model too.
    codes, states = mx.random.randint(0, 2049, (rows, 4, 1)), mx.random.normal((rows, 3, 64))
    before = model(codes, states, mx.ones((rows, 3)))
    head._dense.weight_t = mx.zeros_like(head._dense.weight_t)
    assert float(mx.abs(md._linear(head, mx.random.normal((rows, 1, 64)))).max()) == 0.0
    assert float(mx.abs(md._linear(head, mx.random.normal((rows - 1, 1, 64)))).max()) > 0.0
    assert float(mx.abs(model(codes, states, mx.ones((rows, 3)))).max()) == 0.0 < float(mx.abs(before).max())
    # New weights make a copy stale (fc1 is the same module after load_weights): unused until made again.
    fc1, x = dec.layers[0].fc1, mx.random.normal((rows, 1, 64))
    old = md._linear(fc1, x)
    weights = dict(tree_flatten(model.unfuse().parameters()))
    model.load_weights({k: v * 2 if k.endswith(".scales") else v for k, v in weights.items()})  # same packed ints
    assert dec.layers[0].fc1 is fc1 and fc1._dense is not None
    new = fc1(x.reshape(rows, 64)).reshape(rows, 1, -1)
    assert _maxdiff(new, old) > 0.1 and _maxdiff(md._linear(fc1, x), new) == 0.0
    assert dec.add_dense_copies() == quantized
