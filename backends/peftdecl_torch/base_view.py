"""What HF PEFT's wrapped layers show of the layer they wrap, for model code that reads it after an adapter is
attached (``self.conv.weight``, ``self.lin.in_features``): mixed into the torch backend's ``AdaptedLayer``."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from peftdecl.plan import LayerInfo


class PeftLayerAttributes:
    """``get_base_layer()``, ``weight``, ``in_features``/``out_features`` as HF PEFT names them, and every other
    public attribute of the base layer; the class it is mixed into must be an ``nn.Module`` holding
    ``base_layer`` (a submodule) and ``info`` (its :class:`peftdecl.plan.LayerInfo`)."""

    base_layer: nn.Module
    info: LayerInfo

    def get_base_layer(self) -> nn.Module:
        """The layer this one wraps (HF PEFT's name for it; innermost where wrappers nest)."""
        layer: nn.Module = self.base_layer
        while isinstance(layer, PeftLayerAttributes):
            layer = layer.base_layer
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight as it stores it, as HF PEFT's wrapped layers expose it (bitsandbytes: its
        ``Params4bit``/``Int8Params`` codes), so model code reading ``layer.weight`` keeps working."""
        return cast(torch.Tensor, self.get_base_layer().weight)

    @property
    def in_features(self) -> int:
        """HF PEFT's ``in_features``: input features, channels of a convolution, rows of an embedding."""
        return self.info.in_features

    @property
    def out_features(self) -> int:
        """HF PEFT's ``out_features``: output features, channels of a convolution, width of an embedding."""
        return self.info.out_features

    def __getattr__(self, name: str) -> Any:  # any attribute of any base layer
        """Our own attributes first (nn.Module's lookup), then the base layer's public ones (``kernel_size``,
        ``groups``, ``padding_idx``, ...). Private names are never forwarded: hooks such as accelerate's
        ``_hf_hook`` belong to the base layer alone."""
        try:
            return nn.Module.__getattr__(cast(nn.Module, self), name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if name.startswith("_") or base is None:
                raise
            return getattr(base, name)
