"""Structured channel pruning of convolutions: smaller ``Conv2d`` layers, not masks.

Removing output channel ``c`` of a convolution removes filter ``c`` (and its bias), entry ``c``
of a following ``BatchNorm2d``, and the inputs its consumer reads from channel ``c``: input
channel ``c`` of the next ``Conv2d``, or the ``H*W`` columns of channel ``c`` of a ``Linear`` after
``Flatten`` (channel-major, as ``nn.Flatten`` lays them out). A channel's score is
``||filter c|| * |gamma_c / sqrt(var_c + eps)| * ||consumer weights reading c||`` (the BatchNorm
factor only when there is one): 0 when nothing reads the channel, so such channels go first and
the output does not change, as for :func:`~pimoe.compress.prune.neuron_scores`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn

from pimoe.compress._modules import matches

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _consumer_blocks(consumer: nn.Conv2d | nn.Linear, channels: int) -> Tensor:
    """The consumer's weight as ``[channels, -1]``: everything that reads each input channel."""
    weight = consumer.weight.detach()
    if isinstance(consumer, nn.Conv2d):
        return weight.transpose(0, 1).reshape(channels, -1)
    return weight.reshape(weight.shape[0], channels, -1).transpose(0, 1).reshape(channels, -1)


def channel_scores(
    conv: nn.Conv2d, consumer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None = None
) -> Tensor:
    """``[C_out]`` importance of each output channel of ``conv`` (see the module docstring)."""
    channels = conv.out_channels
    score = conv.weight.detach().reshape(channels, -1).norm(dim=1)
    if bn is not None and bn.weight is not None and bn.running_var is not None:
        score = score * (bn.weight.detach().abs() / (bn.running_var.detach() + bn.eps).sqrt())
    scores: Tensor = score * _consumer_blocks(consumer, channels).norm(dim=1)
    return scores


def _check_pair(conv: nn.Conv2d, consumer: nn.Module, bn: nn.BatchNorm2d | None) -> None:
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise ValueError("conv must be an nn.Conv2d with groups=1")
    if bn is not None and (type(bn) is not nn.BatchNorm2d or bn.num_features != conv.out_channels):
        raise ValueError(f"bn must be a BatchNorm2d over {conv.out_channels} channels")
    if type(consumer) is nn.Conv2d:
        if consumer.groups != 1 or consumer.in_channels != conv.out_channels:
            raise ValueError(
                f"the consumer Conv2d must read {conv.out_channels} channels with groups=1"
            )
    elif type(consumer) is nn.Linear:
        if consumer.in_features % conv.out_channels:
            raise ValueError(
                f"the consumer Linear's {consumer.in_features} inputs are not "
                f"{conv.out_channels} channels x H*W"
            )
    else:
        raise ValueError(
            f"the consumer must be an nn.Conv2d or nn.Linear, got {type(consumer).__name__}"
        )


def _sliced_conv(conv: nn.Conv2d, out_index: Tensor | None, in_index: Tensor | None) -> nn.Conv2d:
    weight = conv.weight.detach()
    weight = weight.index_select(0, out_index) if out_index is not None else weight
    weight = weight.index_select(1, in_index) if in_index is not None else weight
    pair = tuple[int, int]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        cast(pair, conv.kernel_size),
        cast(pair, conv.stride),
        cast(pair | str, conv.padding),
        cast(pair, conv.dilation),
        1,
        conv.bias is not None,
        conv.padding_mode,
        weight.device,
        weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None and new.bias is not None:
            bias = conv.bias.detach()
            new.bias.copy_(bias.index_select(0, out_index) if out_index is not None else bias)
    return new


def _sliced_bn(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device=keep.device
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            source, target = getattr(bn, name), getattr(new, name)
            if source is not None and target is not None:
                target.copy_(source.detach().index_select(0, keep))
        if bn.num_batches_tracked is not None and new.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.to(bn.weight.dtype if bn.weight is not None else torch.float32).train(bn.training)


def prune_conv_channels(
    conv: nn.Conv2d,
    consumer: nn.Conv2d | nn.Linear,
    amount: float,
    *,
    bn: nn.BatchNorm2d | None = None,
) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Conv2d | nn.Linear]:
    """Remove the ``round(amount * C)`` lowest-scored output channels of ``conv`` (>= 1 kept).

    Args:
        conv: ``nn.Conv2d`` (groups 1) whose output feeds ``consumer`` (through ``bn``, element-wise
            activations, pooling or ``Flatten``).
        consumer: the next ``nn.Conv2d`` (reads the channels) or ``nn.Linear`` after ``Flatten``
            (reads ``C * H * W`` features, channel-major).
        amount: fraction of channels to remove, in ``[0, 1)``.

    Returns:
        ``(new conv, new bn or None, new consumer)``: new modules; channel order is kept and
        ``amount=0`` computes the same function.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    _check_pair(conv, consumer, bn)
    scores = channel_scores(conv, consumer, bn)
    channels = scores.numel()
    keep = scores.topk(max(1, channels - round(amount * channels))).indices.sort().values
    new_bn = _sliced_bn(bn, keep) if bn is not None else None
    if isinstance(consumer, nn.Conv2d):
        return _sliced_conv(conv, keep, None), new_bn, _sliced_conv(consumer, None, keep)
    spatial = consumer.in_features // channels
    columns = (keep[:, None] * spatial + torch.arange(spatial, device=keep.device)).flatten()
    weight = consumer.weight.detach().index_select(1, columns)
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], consumer.bias is not None, weight.device, weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if consumer.bias is not None:
            linear.bias.copy_(consumer.bias.detach())
    return _sliced_conv(conv, keep, None), new_bn, linear


def prune_sequential_convs(model: nn.Module, amount: float, skip: Iterable[str] = ()) -> list[str]:
    """:func:`prune_conv_channels` on every ``Conv2d`` of every ``nn.Sequential`` of ``model`` whose
    consumer is a later sibling (see the module docstring), in place. Returns ``"name: C -> C'"``
    notes; convolutions whose consumer is not found that way are left as they are."""
    skip = tuple(skip)
    notes = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq)):
            conv, name = seq[i], f"{seq_name}.{i}" if seq_name else str(i)
            if type(conv) is not nn.Conv2d or conv.groups != 1 or matches(name, skip):
                continue
            found = _find_consumer(seq, i)
            if found is None:
                continue
            bn_index, consumer_index = found
            bn, consumer = seq[bn_index] if bn_index is not None else None, seq[consumer_index]
            assert isinstance(consumer, (nn.Conv2d, nn.Linear)) and isinstance(
                bn, (nn.BatchNorm2d, type(None))
            )
            new_conv, new_bn, new_consumer = prune_conv_channels(conv, consumer, amount, bn=bn)
            seq[i], seq[consumer_index] = new_conv, new_consumer
            if bn_index is not None and new_bn is not None:
                seq[bn_index] = new_bn
            notes.append(f"{name}: {conv.out_channels} -> {new_conv.out_channels} channels")
    return notes


def _find_consumer(seq: nn.Sequential, index: int) -> tuple[int | None, int] | None:
    """``(BatchNorm index or None, consumer index)`` of ``seq[index]``'s consumer, or None."""
    conv = seq[index]
    assert isinstance(conv, nn.Conv2d)
    channels = conv.out_channels
    bn_index: int | None = None
    flattened = False
    for j in range(index + 1, len(seq)):
        module = seq[j]
        if (
            type(module) is nn.BatchNorm2d
            and bn_index is None
            and not flattened
            and module.num_features == channels
        ):
            bn_index = j
        elif type(module) is nn.Flatten and not flattened and module.start_dim == 1:
            flattened = True
        elif isinstance(module, _ELEMENTWISE) or (isinstance(module, _POOLING) and not flattened):
            continue
        elif type(module) is nn.Conv2d and not flattened:
            return (bn_index, j) if module.groups == 1 and module.in_channels == channels else None
        elif type(module) is nn.Linear and flattened:
            return (bn_index, j) if int(module.in_features) % channels == 0 else None
        else:
            return None
    return None


__all__ = ["channel_scores", "prune_conv_channels", "prune_sequential_convs"]
