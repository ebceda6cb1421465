"""Reference: a transformers MusicGen decode loop with each step captured in one CUDA graph.

The ceiling a Linux/NVIDIA user can reach with PyTorch today (what torch ports of MusicGen do):
the step runs the *transformers modules' own weights and layers* (embeddings, LayerNorms,
projections, heads) with a static K/V cache (preallocated, written with `index_copy_` at a
device-side position), classifier-free guidance, top-k and Gumbel-max sampling, all inside
`torch.cuda.graph`; the host only replays the graph. Not included: the delay-pattern forcing
(a `where` per step) and text encoding (cross-attention K/V are computed once, outside the timing).

    from torch_cudagraph import GraphDecoder
    dec = GraphDecoder(model, batch=4, max_len=260, text_len=12)   # model: MusicgenForConditionalGeneration
    steps_per_s = dec.time(250)

`GraphDecoder.logits_eager` (no graph) checks the step against transformers' own forward.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


class GraphDecoder:
    def __init__(self, model, batch: int, max_len: int, text_len: int, guidance: float = 3.0,
                 top_k: int = 250, seed: int = 0):
        dec = model.decoder.model.decoder
        self.dec, self.heads = dec, model.decoder.lm_heads
        cfg = model.decoder.config
        self.K, self.h = cfg.num_codebooks, cfg.hidden_size
        self.H, self.D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.B, self.R, self.L = batch, 2 * batch, max_len
        self.guidance, self.top_k = guidance, top_k
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        self.dev, self.dt = dev, dt
        dec.embed_positions.make_weights(max_len + 2, self.h)
        self.pos_table = dec.embed_positions.weights.to(dev, dt)
        self.tok = torch.full((self.R, self.K), cfg.bos_token_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        shape = (self.R, self.H, max_len, self.D)
        self.kc = [torch.zeros(shape, device=dev, dtype=dt) for _ in dec.layers]
        self.vc = [torch.zeros(shape, device=dev, dtype=dt) for _ in dec.layers]
        g = torch.Generator(device="cpu").manual_seed(seed)
        # Text conditioning: random states for the conditional half, zeros (null) for the other.
        states = torch.randn(batch, text_len, self.h, generator=g).to(dev, dt)
        states = torch.cat([states, torch.zeros_like(states)])
        self.ck, self.cv = [], []
        with torch.inference_mode():
            for layer in dec.layers:
                a = layer.encoder_attn
                self.ck.append(self._heads(a.k_proj(states)))
                self.cv.append(self._heads(a.v_proj(states)))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out_tok = torch.zeros((batch, self.K), dtype=torch.long, device=dev)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        R, T, _ = x.shape
        return x.view(R, T, self.H, self.D).transpose(1, 2)

    def logits_eager(self) -> torch.Tensor:
        """One decoder step at self.pos for self.tok (R, K): logits (R, K, vocab); advances pos."""
        dec = self.dec
        x = sum(dec.embed_tokens[k](self.tok[:, k]) for k in range(self.K))[:, None, :]
        # index_select, not pos_table[pos]: indexing with a 0-d tensor reads it on the host (.item()),
        # which invalidates graph capture (seen on the H200: cudaErrorStreamCaptureInvalidated).
        x = x + self.pos_table.index_select(0, self.pos.view(1))[None]
        visible = (torch.arange(self.L, device=self.dev) <= self.pos)[None, None, None, :]
        for i, layer in enumerate(dec.layers):
            sa = layer.self_attn
            hdn = layer.self_attn_layer_norm(x)
            q, k, v = (self._heads(sa.q_proj(hdn)), self._heads(sa.k_proj(hdn)), self._heads(sa.v_proj(hdn)))
            self.kc[i].index_copy_(2, self.pos.view(1), k)
            self.vc[i].index_copy_(2, self.pos.view(1), v)
            o = F.scaled_dot_product_attention(q, self.kc[i], self.vc[i], attn_mask=visible, scale=sa.scaling)
            x = x + sa.out_proj(o.transpose(1, 2).reshape(self.R, 1, self.h))
            ca = layer.encoder_attn
            hdn = layer.encoder_attn_layer_norm(x)
            o = F.scaled_dot_product_attention(self._heads(ca.q_proj(hdn)), self.ck[i], self.cv[i], scale=ca.scaling)
            x = x + ca.out_proj(o.transpose(1, 2).reshape(self.R, 1, self.h))
            hdn = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(hdn)))
        x = dec.layer_norm(x)[:, 0]
        self.pos.add_(1)
        return torch.stack([head(x) for head in self.heads], dim=1).float()

    def step(self) -> None:
        """Decoder step + CFG + top-k + sampling; writes the next tokens into self.tok."""
        logits = self.logits_eager()
        cond, uncond = logits.chunk(2)
        guided = uncond + self.guidance * (cond - uncond)
        kth = guided.topk(self.top_k, dim=-1).values[..., -1:]
        guided = guided.masked_fill(guided < kth, float("-inf"))
        u = torch.rand_like(guided).clamp_(1e-20, 1.0)
        tok = (guided - torch.log(-torch.log(u))).argmax(-1)
        self.out_tok.copy_(tok)
        self.tok.copy_(torch.cat([tok, tok]))

    def capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(s):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.step()

    def time(self, steps: int, repeats: int = 2) -> float:
        """Best steps/s over `repeats` runs of `steps` replays (positions restart at 0)."""
        if self.graph is None:
            self.capture()
        best = float("inf")
        for _ in range(repeats + 1):  # first: warm-up
            self.pos.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(min(steps, self.L - 1)):
                self.graph.replay()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return min(steps, self.L - 1) / best
