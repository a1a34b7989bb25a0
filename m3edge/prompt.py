"""Prompt assembly: placeholder expansion and M-RoPE position ids (spec sections 3 and 5).

The chat template writes one `<|image_pad|>` per image and one `<|audio_pad|>` per audio clip;
`build_prompt` expands each into as many placeholders as the media has tokens, in order, and
computes Qwen2-VL `get_rope_index`-style positions:

    text / boundary / audio token:  t = h = w = p;             p += 1
    image grid gh x gw at p:        t = p, h = p + row, w = p + col;  then p += max(gh, gw)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from m3edge.errors import MediaError
from m3edge.model.m3lite import M3Config


@dataclass
class Image:
    patches: np.ndarray  # [gh*gw, 3072]
    grid: tuple[int, int]  # (gh, gw)


@dataclass
class Prompt:
    input_ids: torch.Tensor  # [S] long
    position_ids: torch.Tensor  # [3, S] long
    image_patches: torch.Tensor | None  # [N_img_tokens, 3072]
    audio_features: torch.Tensor | None  # [N_audio_tokens, 1024]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def next_position(self) -> int:
        return int(self.position_ids.max()) + 1 if len(self) else 0


def build_prompt(ids: list[int], cfg: M3Config, images: list[Image] = (), audios: list[np.ndarray] = (),
                 start: int = 0) -> Prompt:
    """Expand the placeholders in `ids` with `images` / `audios` (token features [N, 1024]) in order."""
    img_tok, aud_tok = cfg.image_token_id, cfg.audio_token_id
    n_img = sum(1 for i in ids if i == img_tok) if img_tok is not None else 0
    n_aud = sum(1 for i in ids if i == aud_tok) if aud_tok is not None else 0
    if images and cfg.vision_config is None:
        raise MediaError("this model has no vision input; remove the image")
    if audios and cfg.audio_config is None:
        raise MediaError("this model has no audio input; remove the audio")
    if n_img != len(images) or n_aud != len(audios):
        raise MediaError(f"the prompt has {n_img} image and {n_aud} audio placeholders but "
                         f"{len(images)} images and {len(audios)} audio clips were given")
    out_ids: list[int] = []
    pos: list[tuple[int, int, int]] = []
    p = start
    it_img, it_aud = iter(images), iter(audios)
    for tok in ids:
        if img_tok is not None and tok == img_tok:
            gh, gw = next(it_img).grid
            for r in range(gh):
                for c in range(gw):
                    out_ids.append(tok)
                    pos.append((p, p + r, p + c))
            p += max(gh, gw)
        elif aud_tok is not None and tok == aud_tok:
            n = next(it_aud).shape[0]
            out_ids.extend([tok] * n)
            pos.extend((p + i, p + i, p + i) for i in range(n))
            p += n
        else:
            out_ids.append(tok)
            pos.append((p, p, p))
            p += 1
    img = torch.from_numpy(np.concatenate([m.patches for m in images])) if images else None
    aud = torch.from_numpy(np.concatenate(list(audios))) if audios else None
    position_ids = torch.tensor(pos, dtype=torch.long).T.reshape(3, -1)
    return Prompt(torch.tensor(out_ids, dtype=torch.long), position_ids, img, aud)


def collate(prompts: list[Prompt], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Left-pad a batch: input_ids [B, S], position_ids [3, B, S], attention_mask [B, S] (False = pad)."""
    S = max(len(p) for p in prompts)
    B = len(prompts)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    pos = torch.zeros(3, B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        n = len(p)
        ids[b, S - n:] = p.input_ids
        pos[:, b, S - n:] = p.position_ids
        mask[b, S - n:] = True
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask,
            "image_patches": cat([p.image_patches for p in prompts if p.image_patches is not None]),
            "audio_features": cat([p.audio_features for p in prompts if p.audio_features is not None])}
