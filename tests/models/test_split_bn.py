"""SplitBatchNorm2d, split_batchnorm and MoCo's split_bn option (batch-statistics leakage)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from anchorlearn.models.moco import MoCo
from anchorlearn.models.split_bn import SplitBatchNorm2d, split_batchnorm

C = 3


def randomised(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def test_chunk_output_does_not_see_other_chunks_but_plain_bn_does() -> None:
    torch.manual_seed(0)
    split = SplitBatchNorm2d(C, 2).train()
    plain = nn.BatchNorm2d(C).train()
    x = torch.randn(8, C, 4, 4)
    changed = x.clone()
    changed[4:] = 3.0 * torch.randn(4, C, 4, 4) + 2.0  # chunk 1 replaced
    torch.testing.assert_close(split(changed)[:4], split(x)[:4], rtol=0, atol=0)
    assert not torch.allclose(split(changed)[4:], split(x)[4:])
    assert not torch.allclose(plain(changed)[:4], plain(x)[:4])


@pytest.mark.parametrize("splits, batch", [(2, 8), (4, 8), (3, 7), (4, 3)])
def test_training_output_and_running_stats_match_independent_chunks(
    splits: int, batch: int
) -> None:
    torch.manual_seed(1)
    plain = randomised(nn.BatchNorm2d(C, momentum=0.3))
    split = SplitBatchNorm2d(C, splits, momentum=0.3)
    split.load_state_dict(plain.state_dict())
    x = torch.randn(batch, C, 3, 3)
    out = split.train()(x)
    # independent computation: one fresh nn.BatchNorm2d step per chunk (tensor_split sizes)
    outs, means, variances = [], [], []
    for chunk in torch.tensor_split(x, min(splits, batch)):
        bn = nn.BatchNorm2d(C, momentum=0.3)
        bn.load_state_dict(plain.state_dict())
        outs.append(bn.train()(chunk))
        means.append(bn.running_mean)
        variances.append(bn.running_var)
    torch.testing.assert_close(out, torch.cat(outs))
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    # the same in closed form: (1 - m) r + m * mean over chunks of the unbiased statistics
    chunks = torch.tensor_split(x, min(splits, batch))
    chunk_means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    chunk_vars = torch.stack([c.transpose(0, 1).flatten(1).var(dim=1) for c in chunks]).mean(0)
    torch.testing.assert_close(split.running_mean, 0.7 * plain.running_mean + 0.3 * chunk_means)
    torch.testing.assert_close(split.running_var, 0.7 * plain.running_var + 0.3 * chunk_vars)
    assert int(split.num_batches_tracked) == 1
    # gradients reach the shared affine parameters
    out.square().sum().backward()
    assert split.weight.grad is not None and split.bias.grad is not None


def test_cumulative_momentum_counts_one_batch_per_forward() -> None:
    torch.manual_seed(2)
    split = SplitBatchNorm2d(C, 2, momentum=None).train()
    xs = [torch.randn(4, C, 2, 2) for _ in range(2)]
    for x in xs:
        split(x)
    assert int(split.num_batches_tracked) == 2
    # factor 1, then 1/2: the running mean is the average of the two batches' chunk means
    expected = torch.stack([torch.stack([c.mean(dim=(0, 2, 3)) for c in x.chunk(2)]) for x in xs])
    torch.testing.assert_close(split.running_mean, expected.mean(dim=(0, 1)))


def test_eval_mode_equals_batchnorm_with_the_same_state() -> None:
    torch.manual_seed(3)
    split = SplitBatchNorm2d(C, 4)
    split(torch.randn(8, C, 3, 3))  # move the running statistics
    plain = nn.BatchNorm2d(C)
    plain.load_state_dict(split.state_dict())
    x = torch.randn(5, C, 3, 3)
    torch.testing.assert_close(split.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_split_batchnorm_converts_in_place_and_keeps_state_dict_keys() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, C, 3), randomised(nn.BatchNorm2d(C)), nn.Sequential(nn.BatchNorm2d(C))
    )
    net[2][0].weight.requires_grad_(False)
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 1, 6, 6)
    before = net(x)
    assert split_batchnorm(net, 2) == 2
    assert isinstance(net[1], SplitBatchNorm2d) and isinstance(net[2][0], SplitBatchNorm2d)
    assert net[1].num_splits == 2 and not net[1].training
    assert not net[2][0].weight.requires_grad and net[1].weight.requires_grad
    assert list(net.state_dict()) == list(state)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    # a checkpoint round trip into an unconverted network
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Conv2d(1, C, 3), nn.BatchNorm2d(C), nn.Sequential(nn.BatchNorm2d(C)))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert split_batchnorm(net, 4) == 2 and net[1].num_splits == 4  # re-split
    assert split_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), 2) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_splits must be >= 1, got 0"):
        SplitBatchNorm2d(C, 0)
    with pytest.raises(TypeError, match="num_splits must be an int, got float"):
        SplitBatchNorm2d(C, 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be an nn\.Module, got str"):
        split_batchnorm("net", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="convert its parent module"):
        split_batchnorm(nn.BatchNorm2d(C), 2)
    with pytest.raises(ValueError, match="expected 4D input"):
        SplitBatchNorm2d(C, 2).train()(torch.randn(4, C))
    with pytest.raises(ValueError, match="at least one sample"):
        SplitBatchNorm2d(C, 2).train()(torch.randn(0, C, 2, 2))


# --- MoCo: a key's BatchNorm group is a random group, not its query's group -------------

FEAT, DIM, N, G = 4, 3, 8, 2


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, FEAT, 3, padding=1),
            nn.BatchNorm2d(FEAT),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def make_moco(split_bn: int) -> MoCo:
    torch.manual_seed(5)
    return MoCo(ConvNet(), FEAT, dim=DIM, queue_size=16, momentum=1.0, split_bn=split_bn)


def keys_with_order(model: MoCo, x_q: torch.Tensor, x_k: torch.Tensor, seed: int):
    """The keys of a training forward and the key-batch permutation it drew."""
    torch.manual_seed(seed)
    order = torch.randperm(N)
    torch.manual_seed(seed)
    return model(x_q, x_k)["k"], order


def test_moco_key_is_normalised_without_the_other_groups_samples() -> None:
    model = make_moco(G)
    assert all(
        isinstance(m, SplitBatchNorm2d) and m.num_splits == G
        for enc in (model.encoder_q, model.encoder_k)
        for m in enc.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    torch.manual_seed(6)
    x_q, x_k = torch.randn(N, 1, 5, 5), torch.randn(N, 1, 5, 5)
    seed = 7
    keys, order = keys_with_order(model, x_q, x_k, seed)
    key_groups = [set(chunk.tolist()) for chunk in order.chunk(G)]
    query_groups = [set(range(g * N // G, (g + 1) * N // G)) for g in range(G)]
    assert key_groups != query_groups  # the shuffle breaks the query's grouping
    # change the views of every sample outside key group 0: its keys do not move
    outside = sorted(set(range(N)) - key_groups[0])
    changed = x_k.clone()
    changed[outside] = 5.0 * torch.randn(len(outside), 1, 5, 5) + 1.0
    keys_changed, _ = keys_with_order(model, x_q, changed, seed)
    inside = sorted(key_groups[0])
    torch.testing.assert_close(keys_changed[inside], keys[inside])
    assert not torch.allclose(keys_changed[outside], keys[outside])
    # with ordinary BatchNorm every key sees the whole batch
    plain = make_moco(0)
    base, _ = keys_with_order(plain, x_q, x_k, seed)
    moved, _ = keys_with_order(plain, x_q, changed, seed)
    assert not torch.allclose(moved[inside], base[inside])


def test_moco_split_bn_keeps_state_dict_and_eval_behaviour() -> None:
    split, plain = make_moco(G), make_moco(0)
    assert list(split.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(split.state_dict())
    split.eval()
    plain.eval()
    x = torch.randn(N, 1, 5, 5)
    torch.testing.assert_close(split.embed(x), plain.embed(x), rtol=0, atol=0)
    out_split, out_plain = split(x, x), plain(x, x)
    torch.testing.assert_close(out_split["logits"], out_plain["logits"], rtol=0, atol=0)
    # training with a batch not divisible by G (an epoch's last batch) still works
    split.train()
    assert split(torch.randn(5, 1, 5, 5), torch.randn(5, 1, 5, 5))["k"].shape == (5, DIM)


def test_moco_split_bn_arguments() -> None:
    with pytest.raises(ValueError, match=r"split_bn must be 0 \(off\) or an int >= 2, got 1"):
        MoCo(ConvNet(), FEAT, split_bn=1)
    with pytest.raises(ValueError, match="split_bn=2 needs a backbone with BatchNorm2d"):
        MoCo(nn.Linear(6, FEAT), FEAT, split_bn=2)
