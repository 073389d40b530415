"""The InfiniteTalk transformer: diffusers' Wan2.1 I2V DiT plus the InfiniteTalk audio adapter.

The Wan backbone (patch embedding, time/text/image conditioning, self- and cross-attention blocks, head) is diffusers'
`WanTransformer3DModel` and its `WanTransformerBlock` / `WanAttention` modules, so attention backends, caches, LoRA
and offload hooks apply unchanged. Ours is what InfiniteTalk adds (docs/REFERENCE.md §1.5–1.8):

* `AudioProjection` turns per-frame wav2vec2 windows into `context_tokens` audio tokens per latent frame;
* each block gets `norm_x` + a frame-local audio cross-attention after the text/image cross-attention;
* with two speakers, each block's self-attention also yields the first-frame attention map that routes every visual
  token to a speaker via a 1-D RoPE (L-RoPE). It is computed only for two speakers (the reference computes it in
  every block for one speaker too and throws it away), with one fused attention call per block whose values are
  the speaker masks.

Sequence parallel (`parallel/sequence.py`, a torchrun job): `forward` runs this process's slice of the tokens through
the blocks and gathers the slices after the head; the blocks take the slice (`shard`) for the self-attention's
first-frame keys, the routing's min/max and the audio attention's frame boundaries.

State-dict names: diffusers names for the backbone, the released InfiniteTalk names for the adapter
(`blocks.N.audio_cross_attn.*`, `blocks.N.norm_x.*`, `audio_proj.*`). `models/transformer_loading.py` converts the
released formats to these names.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock

from .attention_kernels import KERNELS
from .configs import DiTConfig
from .diffusers_adapter import context_parallel_attention

# L-RoPE positions (reference class_range=24, class_interval=4): speaker-1 tokens in [0, 4], speaker-2 tokens in
# [20, 24], background 12; speaker-1 audio tokens sit at 2 and speaker-2 audio tokens at 22.
SPEAKER1_RANGE = (0.0, 4.0)
SPEAKER2_RANGE = (20.0, 24.0)
BACKGROUND_POS = 12.0


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of `x` [B, L, H, D] by angles given as repeated cos/sin [.., L, 1, D]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def sinusoidal_embedding(timestep: torch.Tensor, channels: int) -> torch.Tensor:
    """[cos(t w_i) | sin(t w_i)], w_i = 10000^(-i/half), in float64 like the reference (t ~ 1000 makes float32
    phases lose ~1e-4), returned as float32. diffusers' `Timesteps` computes this in float32."""
    half = channels // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = timestep.double().reshape(-1, 1) * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE of `x` [B, L, H, D] at real-valued `positions` [L] (base 1e4, interleaved pairs, float32)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq[None, :]  # [L, D/2]
    angles = angles.repeat_interleave(2, dim=-1)[None, :, None, :]
    return _apply_rope(x, angles.cos(), angles.sin())


class InfiniteTalkAttnProcessor:
    """Attention for the Wan self- and cross-attention modules.

    Same maths as diffusers' Wan processor (q/k RMS-norm over all heads, interleaved 3-D RoPE, image and text
    attentions summed before `to_out`), through diffusers' attention dispatcher so the configured backend runs. It
    differs where InfiniteTalk needs it: the text length is not assumed to be 512 (the image-token count is passed),
    and the self-attention can also return the first-frame attention map used for two-speaker routing.
    """

    _attention_backend = None
    _parallel_config = None  # diffusers ParallelConfig under sequence parallelism (self-attention only)
    _cp_forward_op = None  # the local attention op inside diffusers' context-parallel attention, when not its own
    _kernel = None  # one of attention_kernels.KERNELS, used instead of the dispatcher when set

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_tokens: int = 0,
        ref_masks: torch.Tensor | None = None,
        frame_tokens: int = 0,
        shard=None,
    ):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        image_context = None
        if encoder_hidden_states is not None and image_tokens:
            image_context, context = context[:, :image_tokens], context[:, image_tokens:]

        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rope(query, *rotary_emb)
            key = _apply_rope(key, *rotary_emb)

        out = self._attend(query, key, value, attention_mask, self_attention=encoder_hidden_states is None)
        if image_context is not None:
            key_img = attn.norm_added_k(attn.add_k_proj(image_context)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(image_context).unflatten(2, (attn.heads, -1))
            out = out + self._attend(query, key_img, value_img, None, self_attention=False)
        out = attn.to_out[1](attn.to_out[0](out))

        if ref_masks is None:
            return out
        with torch.no_grad():
            ref_key = key[:, :frame_tokens] if shard is None else shard.first_frame_keys(key)
            ref_map = first_frame_attention_map(query, ref_key, ref_masks)
        return out, ref_map

    def _attend(self, q, k, v, mask, self_attention: bool) -> torch.Tensor:
        parallel = self._parallel_config if self_attention else None
        if parallel is not None and self._cp_forward_op is not None:  # diffusers' Ulysses/ring around our op
            out = context_parallel_attention(q, k, v, mask, self._cp_forward_op, parallel)
            return out.flatten(2, 3).type_as(q)
        if self._kernel is not None:
            if mask is not None:
                raise RuntimeError("the selected attention kernel takes no attention mask")
            return self._kernel(q, k, v).flatten(2, 3).type_as(q)
        out = dispatch_attention_fn(
            q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
            parallel_config=parallel,
        )
        return out.flatten(2, 3).type_as(q)


def first_frame_attention_map(query: torch.Tensor, ref_key: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[classes, L]: per visual token, the mean attention mass on the first-frame keys inside each class mask.

    `query` [1, L, H, D] and `ref_key` [1, HW, H, D] are post-RoPE; `masks` [classes, HW] are 0/1. Softmax over the
    first-frame keys with scale 1/sqrt(D), mass per mask divided by the mask size, averaged over heads.

    One fused attention call whose values are the masks (zero-padded to the head dim, which the fused kernels
    need) gives each query's probability mass per class directly, so the [heads, L, HW] probabilities are never
    materialised; torch SDPA picks its fused kernel (flash/cuDNN/efficient on a GPU, flash or math on the CPU).
    """
    classes, frame_tokens = masks.shape
    heads, dim = query.shape[2], query.shape[3]
    values = torch.zeros(1, heads, frame_tokens, dim, device=query.device, dtype=query.dtype)
    values[..., :classes] = masks.T.to(query.dtype)  # 0/1: exact in every dtype
    mass = F.scaled_dot_product_attention(query.transpose(1, 2), ref_key.transpose(1, 2), values)
    mass = mass[..., :classes].float().mean(dim=1)[0]  # [L, classes], averaged over heads
    return (mass / masks.float().sum(-1)).T.contiguous()


def route_positions(ref_map: torch.Tensor, extrema=None) -> torch.Tensor:
    """L-RoPE position per visual token from a [3, L] first-frame map (speaker 1, speaker 2, background).

    Each row is rescaled by its min/max over all tokens: `extrema(ref_map) -> (mins, maxs)` gives them when this
    process holds only a slice of the tokens (sequence parallel)."""
    mins, maxs = (ref_map.amin(-1), ref_map.amax(-1)) if extrema is None else extrema(ref_map)

    def scaled(i: int, lo: float, hi: float) -> torch.Tensor:
        return (ref_map[i] - mins[i]) / (maxs[i] - mins[i] + 1e-8) * (hi - lo) + lo

    candidates = torch.stack(
        [
            scaled(0, *SPEAKER1_RANGE),
            scaled(1, *SPEAKER2_RANGE),
            torch.full_like(ref_map[0], BACKGROUND_POS),
        ]
    )
    return candidates.gather(0, ref_map.argmax(0, keepdim=True))[0]


class AudioProjection(nn.Module):
    """wav2vec2 windows -> audio tokens per latent frame (`audio_proj` of the released adapter).

    Latent frame 0 takes the 5-frame window of video frame 0 (`proj1`); latent frame j >= 1 covers video frames
    4j-3..4j and takes window slots 0-2 of the first, slot 2 of the middle two and slots 2-4 of the last (8 rows,
    `proj1_vf`). Then ReLU, `proj2`, ReLU, `proj3` -> [context_tokens, output_dim], LayerNorm (eps 1e-5, fp32).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        window, layers, channels = cfg.audio_window, cfg.audio_layers, cfg.audio_dim
        self.vae_scale = cfg.vae_scale
        self.window = window
        self.context_tokens = cfg.context_tokens
        self.output_dim = cfg.output_dim
        self.proj1 = nn.Linear(window * layers * channels, cfg.intermediate_dim)
        self.proj1_vf = nn.Linear((window + cfg.vae_scale - 1) * layers * channels, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = FP32LayerNorm(cfg.output_dim, eps=1e-5)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """`audio` [persons, frames, window, layers, channels] -> tokens [1, latent_frames, persons*K, output_dim]."""
        persons, frames = audio.shape[:2]
        mid = self.window // 2
        first = audio[:, :1].flatten(2)  # [P, 1, W*L*C]
        later = audio[:, 1:].unflatten(1, ((frames - 1) // self.vae_scale, self.vae_scale))  # [P, T-1, 4, W, L, C]
        later = torch.cat(
            [later[:, :, 0, : mid + 1], later[:, :, 1:-1, mid], later[:, :, -1, mid:]], dim=2
        ).flatten(2)  # [P, T-1, 8*L*C]
        hidden = torch.cat([F.relu(self.proj1(first)), F.relu(self.proj1_vf(later))], dim=1)  # [P, T, I]
        tokens = self.proj3(F.relu(self.proj2(hidden)))
        tokens = self.norm(tokens.unflatten(-1, (self.context_tokens, self.output_dim)))  # [P, T, K, D]
        return tokens.permute(1, 0, 2, 3).flatten(1, 2).unsqueeze(0)  # persons side by side per frame


class AudioCrossAttention(nn.Module):
    """Frame-local cross-attention from visual tokens to that latent frame's audio tokens (released names)."""

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self._attention_backend = None
        self._kernel = None

    def forward(
        self, x: torch.Tensor, audio_tokens: torch.Tensor, num_frames: int, route_pos: torch.Tensor | None = None,
        token_offset: int = 0, frame_tokens: int | None = None,
    ) -> torch.Tensor:
        """`x` [B, T*S, dim], `audio_tokens` [B, T, M, audio_dim]; `route_pos` [T*S] enables two-speaker L-RoPE.

        Under sequence parallelism `x` is the slice of tokens from global index `token_offset` on (S =
        `frame_tokens` per frame); it may cut through frames: the slice is padded to whole frames for the attention
        and the padding dropped after."""
        batch, length, dim = x.shape
        per_frame_tokens = frame_tokens or length // num_frames
        lead, first = token_offset % per_frame_tokens, token_offset // per_frame_tokens
        frames = -(-(lead + length) // per_frame_tokens)  # frames this slice touches
        tail = frames * per_frame_tokens - lead - length
        audio_tokens = audio_tokens[:, first:first + frames]
        q = self.q_linear(x).unflatten(2, (self.num_heads, -1))  # [B, L, H, D]
        k, v = self.kv_linear(audio_tokens).unflatten(-1, (2, self.num_heads, -1)).unbind(-3)  # [B, T, M, H, D]
        if route_pos is not None:
            q = rope_1d(q, route_pos)
            per_frame = audio_tokens.shape[2]
            key_pos = torch.full((per_frame,), sum(SPEAKER2_RANGE) / 2, device=x.device)
            key_pos[: per_frame // 2] = sum(SPEAKER1_RANGE) / 2
            k = rope_1d(k.flatten(1, 2), key_pos.repeat(frames)).unflatten(1, (frames, per_frame))
        if lead or tail:
            q = F.pad(q, (0, 0, 0, 0, lead, tail))
        q = q.unflatten(1, (frames, -1)).flatten(0, 1)  # [B*T, S, H, D]
        if self._kernel is not None:
            out = self._kernel(q, k.flatten(0, 1), v.flatten(0, 1))
        else:
            out = dispatch_attention_fn(q, k.flatten(0, 1), v.flatten(0, 1), backend=self._attention_backend)
        out = out.flatten(2).reshape(batch, frames * per_frame_tokens, dim)
        return self.proj(out[:, lead:lead + length] if lead or tail else out)


class InfiniteTalkBlock(WanTransformerBlock):
    """A Wan block plus the InfiniteTalk audio path (after the text/image cross-attention, before the FFN)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__(
            cfg.dim, cfg.ffn_dim, cfg.num_heads, "rms_norm_across_heads", True, cfg.eps, added_kv_proj_dim=cfg.dim
        )
        self.attn1.set_processor(InfiniteTalkAttnProcessor())
        self.attn2.set_processor(InfiniteTalkAttnProcessor())
        self.norm_x = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.audio_cross_attn = AudioCrossAttention(cfg.dim, cfg.output_dim, cfg.num_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_tokens: torch.Tensor | None = None,
        image_tokens: int = 0,
        frame_shape: tuple[int, int, int] = (1, 1, 1),
        ref_masks: torch.Tensor | None = None,
        shard=None,
    ) -> torch.Tensor:
        """`shard` (parallel/sequence.py `TokenShard`): this process holds only a slice of the tokens."""
        shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, 1)
        num_frames, rows, cols = frame_shape

        norm_x = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
        attn_out = self.attn1(norm_x, None, None, rotary_emb, ref_masks=ref_masks, frame_tokens=rows * cols,
                              shard=shard)
        route_pos = None
        if ref_masks is not None:
            attn_out, ref_map = attn_out
            route_pos = route_positions(ref_map, None if shard is None else shard.row_extrema)
            self.last_ref_map = ref_map  # kept for inspection (tests, debugging); tiny [3, L]
        hidden_states = (hidden_states.float() + attn_out * gate_msa).type_as(hidden_states)

        norm_x = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_x, encoder_hidden_states, None, None, image_tokens=image_tokens)

        if audio_tokens is not None:
            norm_x = self.norm_x(hidden_states)
            offset = 0 if shard is None else shard.start
            hidden_states = hidden_states + self.audio_cross_attn(norm_x, audio_tokens, num_frames, route_pos,
                                                                  offset, rows * cols)

        norm_x = (self.norm3(hidden_states.float()) * (1 + c_scale) + c_shift).type_as(hidden_states)
        ff_out = self.ffn(norm_x)
        return (hidden_states.float() + ff_out.float() * c_gate).type_as(hidden_states)


class InfiniteTalkTransformer(WanTransformer3DModel):
    """Wan2.1-I2V DiT + InfiniteTalk adapter. Build with `InfiniteTalkTransformer.from_dit_config(cfg)`."""

    _no_split_modules = ["InfiniteTalkBlock"]
    sequence_parallel = None  # parallel/sequence.py SequenceParallel: each process runs a slice of the tokens
    _repeated_blocks = ["InfiniteTalkBlock"]
    # The reference keeps the time MLPs, modulation, norms and the head in float32 (docs/REFERENCE.md §1.2).
    _keep_in_fp32_modules = [
        "rope", "time_embedder", "time_proj", "scale_shift_table", "norm1", "norm2", "norm3", "norm_x", "proj_out",
        "audio_proj.norm",
    ]

    @classmethod
    def from_dit_config(cls, cfg: DiTConfig) -> InfiniteTalkTransformer:
        model = cls(
            patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=0, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim, rope_max_seq_len=cfg.rope_max_seq_len,
        )
        model.dit_config = cfg
        model.register_to_config(num_layers=cfg.num_layers, infinite_talk=asdict(cfg))
        model.blocks = nn.ModuleList([InfiniteTalkBlock(cfg) for _ in range(cfg.num_layers)])
        model.audio_proj = AudioProjection(cfg)
        return model

    def set_attention_backend(self, backend: str) -> None:
        """A diffusers dispatcher backend name, or one of ours (`attention_kernels.KERNELS`), for every attention:
        self, text/image cross and audio cross."""
        kernel = KERNELS.get(backend)
        super().set_attention_backend("native" if kernel else backend)
        for block in self.blocks:
            for processor in (block.attn1.processor, block.attn2.processor):
                processor._kernel = kernel
            block.audio_cross_attn._attention_backend = block.attn1.processor._attention_backend
            block.audio_cross_attn._kernel = kernel
        self.attention_kernel = backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        condition: torch.Tensor,
        audio: torch.Tensor,
        ref_target_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoiser call.

        hidden_states [B,16,T,h,w] noisy latent; timestep [B] on the 0..1000 scale; encoder_hidden_states
        [B, L<=text_len, text_dim] T5 rows (zero-padded here to text_len, padded rows attended as trained);
        encoder_hidden_states_image [B, tokens, image_dim] CLIP penultimate tokens; condition [B,20,T,h,w]
        (4 mask channels + 16 reference-latent channels); audio [persons, F=4(T-1)+1, window, layers, channels];
        ref_target_masks [3, h, w] (speaker 1, speaker 2, background; used for two speakers). Returns the
        prediction [B,16,T,h,w] in float32.
        """
        cfg = self.dit_config
        dtype = self.patch_embedding.weight.dtype
        batch, _, frames, height, width = hidden_states.shape
        rows, cols = height // 2, width // 2
        persons = audio.shape[0]
        if audio.shape[1] != 4 * (frames - 1) + 1:
            raise ValueError(f"audio covers {audio.shape[1]} video frames; {4 * (frames - 1) + 1} expected")

        x = torch.cat([hidden_states, condition], dim=1).to(dtype)
        rotary_emb = self.rope(x)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        shard = None
        if self.sequence_parallel is not None:  # this process runs its slice of the tokens through the blocks
            shard = self.sequence_parallel.shard(x.shape[1], rows * cols)
            x = shard.split(x)
            rotary_emb = tuple(shard.split(r) for r in rotary_emb)

        emb = self.condition_embedder
        t_freq = sinusoidal_embedding(timestep, cfg.freq_dim)
        temb = emb.time_embedder(t_freq.to(emb.time_embedder.linear_1.weight.dtype)).float()
        temb_6 = emb.time_proj(emb.act_fn(temb).to(emb.time_proj.weight.dtype)).float().unflatten(1, (6, -1))

        text = encoder_hidden_states
        if text.shape[1] > cfg.text_len:
            raise ValueError(f"text context has {text.shape[1]} rows; at most {cfg.text_len}")
        text = F.pad(text, (0, 0, 0, cfg.text_len - text.shape[1])).to(dtype)
        context = torch.cat([emb.image_embedder(encoder_hidden_states_image.to(dtype)), emb.text_embedder(text)], 1)
        context = context.to(dtype)
        image_tokens = encoder_hidden_states_image.shape[1]

        audio_tokens = self.audio_proj(audio.to(dtype)).to(dtype).expand(batch, -1, -1, -1)
        token_masks = None
        if persons == 2:
            if ref_target_masks is None:
                raise ValueError("two speakers need ref_target_masks [3, h, w]")
            token_masks = F.interpolate(ref_target_masks[None].float(), size=(rows, cols), mode="nearest")[0]
            token_masks = (token_masks > 0).flatten(1).float()
        elif persons != 1:
            raise ValueError(f"1 or 2 speakers are supported, got {persons}")

        for block in self.blocks:
            x = block(x, context, temb_6, rotary_emb, audio_tokens, image_tokens, (frames, rows, cols), token_masks,
                      shard)

        shift, scale = (self.scale_shift_table.float() + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.norm_out(x.float()) * (1 + scale) + shift
        x = self.proj_out(x.to(self.proj_out.weight.dtype)).float()
        if shard is not None:
            x = shard.gather(x)
        x = x.reshape(batch, frames, rows, cols, 1, 2, 2, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
