"""Torch references for the VideoLLaMA2 tests: the STC connector as the release composes it, and the whole
model assembled from transformers' towers / LMs plus that connector.

timm cannot be imported here (it imports torchvision, whose only wheel is a CUDA build that fails next to
the CPU torch), so the connector's RegStage is rebuilt from timm 1.0.3's ``timm/models/regnet.py`` (the
version VideoLLaMA2's requirements pin): ``Bottleneck`` with its defaults (``bottle_ratio=1``,
``group_size=1`` -> a depthwise 3x3, ``se_ratio=0.25`` of the block's *input* channels,
``downsample="conv1x1"``, ``linear_out=False``), ``ConvNormAct`` (bias-free conv, then ``LayerNormAct2d``:
timm's ``get_norm_act_layer`` maps ``LayerNorm2d`` to it, eps 1e-5, with the activation unless
``apply_act=False``), ``SEModule`` (mean over space, 1x1 conv + act, 1x1 conv, sigmoid gate) and the
attribute names that give the checkpoint keys (``conv1.conv``, ``conv1.bn``, ``se.fc1``, ``downsample``...).
"""

from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file


class LayerNormAct2d(nn.LayerNorm):
    def __init__(self, channels, apply_act=True, eps=1e-5):
        super().__init__(channels, eps=eps)
        self.act = nn.SiLU() if apply_act else nn.Identity()

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, kernel, groups=1, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(cout, apply_act)

    def forward(self, x):
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    def __init__(self, channels, rd_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x):
        s = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SEModule(cout, int(round(cin * 0.25)))
        self.conv3 = ConvNormAct(cout, cout, 1, apply_act=False)
        self.act3 = nn.SiLU()
        self.downsample = ConvNormAct(cin, cout, 1, apply_act=False) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv3(self.se(self.conv2(self.conv1(x))))
        return self.act3(h + self.downsample(x))


class RegStage(nn.Module):
    def __init__(self, depth, cin, cout):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class STCConnector(nn.Module):
    """The release's ``STCConnector`` (depth 4, downsample (2, 2, 2), padding 1, MLP depth 2)."""

    def __init__(self, in_hidden, hidden, depth=4):
        super().__init__()
        self.s1 = RegStage(depth, in_hidden, hidden)
        self.sampler = nn.Sequential(nn.Conv3d(hidden, hidden, 2, stride=2, padding=1, bias=True), nn.SiLU())
        self.s2 = RegStage(depth, hidden, hidden)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x):
        """``x [b, t, h, w, d]`` -> ``[b, t'*h'*w', hidden]``."""
        b, t, h, w, d = x.shape
        x = x.permute(0, 1, 4, 2, 3).reshape(b * t, d, h, w)
        x = self.s1(x)
        x = x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # b d t h w
        x = self.sampler(x)
        t2 = x.shape[2]
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t2, *x.shape[1:2], *x.shape[3:])
        x = self.s2(x)
        x = x.reshape(b, t2, *x.shape[1:]).permute(0, 1, 3, 4, 2).reshape(b, -1, x.shape[1])
        return self.readout(x)


def randomize_(module: nn.Module, generator: torch.Generator, std: float = 0.1) -> None:
    """Fresh random weights everywhere: LayerNorm scales ``1 + N(0, 0.1)``, the rest ``N(0, std)``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            is_norm = isinstance(module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module,
                                 nn.LayerNorm) or "norm" in name or "layrnorm" in name
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else std * noise)


def torch_tower(cfg):
    v = cfg.vision
    common = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                  layer_norm_eps=v.layer_norm_eps, attn_implementation="eager")
    if v.kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))


def torch_lm(cfg):
    t = cfg.text
    common = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                  num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                  rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, tie_word_embeddings=False,
                  attn_implementation="eager")
    if cfg.lm_type == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))


def write_reference_folder(cfg, folder):
    """Random torch tower + STC connector + LM for ``cfg``, written as one checkpoint folder in the release's
    key layout (``config.json`` from ``cfg``). Returns ``(tower, connector, lm)`` in eval mode."""
    gen = torch.Generator().manual_seed(7)
    tw, conn, lm = torch_tower(cfg), STCConnector(cfg.connector.in_hidden, cfg.connector.hidden), torch_lm(cfg)
    for module in (tw, conn, lm):
        randomize_(module, gen, std=0.1)
        module.eval()
    # the release saved the tower with transformers 4's ``vision_model.`` level, which transformers 5 drops
    tensors = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
               for k, v in tw.state_dict().items()}
    tensors.update({"model.mm_projector." + k: v for k, v in conn.state_dict().items()})
    tensors.update(lm.state_dict())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return tw, conn, lm


def reference_prompt_embeds(tower, connector, lm, cfg, pixels, before, after):
    """The release's merge: ``before`` ids, the video's connector tokens, ``after`` ids -> ``[1, N, D]``."""
    with torch.no_grad():
        hs = tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[cfg.vision.select_layer]
        hs = hs[:, 1:] if cfg.vision.kind == "clip" else hs
        side = cfg.vision.patches_per_side
        feats = connector(hs.reshape(1, pixels.shape[0], side, side, -1))[0]
        embed = lm.get_input_embeddings()
        return torch.cat([embed(torch.from_numpy(before)), feats, embed(torch.from_numpy(after))])[None]
