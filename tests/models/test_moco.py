"""MoCo with tiny backbones defined here: encoders, momentum update, queue, embed."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anchorlearn.losses.contrastive import InfoNCE
from anchorlearn.models.moco import MoCo

IN, FEAT, DIM, K, N = 6, 8, 4, 10, 4


class FeatureNet(nn.Module):
    """Exposes forward_features; forward returns logits that MoCo must not use."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN, FEAT), nn.BatchNorm1d(FEAT), nn.ReLU())
        self.classifier = nn.Linear(FEAT, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class PairNet(nn.Module):
    """Returns (logits, features) from forward, no forward_features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN, FEAT)
        self.classifier = nn.Linear(FEAT, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x)
        return self.classifier(feats), feats


def make(momentum: float = 0.99, backbone: nn.Module | None = None, **kw: object) -> MoCo:
    return MoCo(backbone or FeatureNet(), FEAT, dim=DIM, queue_size=K, momentum=momentum, **kw)


@pytest.mark.parametrize("backbone_cls", [FeatureNet, PairNet, lambda: nn.Linear(IN, FEAT)])
@pytest.mark.parametrize("mlp", [True, False])
def test_forward_shapes_and_normalisation(backbone_cls: type[nn.Module], mlp: bool) -> None:
    model = make(backbone=backbone_cls(), mlp=mlp, hidden_dim=5)
    out = model(torch.randn(N, IN), torch.randn(N, IN))
    assert out["q"].shape == (N, DIM) and out["k"].shape == (N, DIM)
    assert out["logits"].shape == (N, 1 + K) and out["queue"].shape == (K, DIM)
    assert torch.equal(out["labels"], torch.zeros(N, dtype=torch.long))
    torch.testing.assert_close(out["q"].norm(dim=1), torch.ones(N))
    torch.testing.assert_close(out["k"].norm(dim=1), torch.ones(N))
    assert out["q"].requires_grad and not out["k"].requires_grad


def test_logits_reproduce_infonce() -> None:
    model = make()
    out = model(torch.randn(N, IN), torch.randn(N, IN))
    from_logits = F.cross_entropy(out["logits"], out["labels"])
    from_loss = InfoNCE(temperature=0.2)(out["q"], out["k"], out["queue"])["loss"]
    torch.testing.assert_close(from_logits, from_loss)


def test_key_encoder_starts_equal_and_gets_no_gradient() -> None:
    model = make(momentum=1.0)  # momentum 1: the key encoder never moves
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and not pk.requires_grad
    before = [p.clone() for p in model.encoder_k.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(2):
        out = model(torch.randn(N, IN), torch.randn(N, IN))
        F.cross_entropy(out["logits"], out["labels"]).backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    for b, p in zip(before, model.encoder_k.parameters(), strict=True):
        assert torch.equal(b, p)
    assert not torch.equal(before[0], model.encoder_q.backbone.body[0].weight)


def test_momentum_update_formula() -> None:
    model = make(momentum=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    k_params = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for pq, pk, new in zip(q_params, k_params, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * pk + 0.1 * pq)


def test_queue_pointer_wraps_around() -> None:
    model = make()
    batches = [F.normalize(torch.randn(4, DIM), dim=1) for _ in range(3)]
    for b in batches:
        model.dequeue_and_enqueue(b)
    assert int(model.queue_ptr) == 2  # 12 keys into 10 slots
    torch.testing.assert_close(model.queue[:, 4:8], batches[1].t())
    torch.testing.assert_close(model.queue[:, 8:10], batches[2][:2].t())
    torch.testing.assert_close(model.queue[:, 0:2], batches[2][2:].t())


def test_batch_larger_than_queue_keeps_last_keys() -> None:
    model = make()
    model.dequeue_and_enqueue(F.normalize(torch.randn(3, DIM), dim=1))
    keys = F.normalize(torch.randn(25, DIM), dim=1)
    model.dequeue_and_enqueue(keys)
    assert int(model.queue_ptr) == (3 + 25) % K
    # sequential writes from slot 3: key j lands in slot (3 + j) % K; the last K survive
    for j in range(15, 25):
        torch.testing.assert_close(model.queue[:, (3 + j) % K], keys[j])
    with pytest.raises(ValueError, match=r"keys must have shape \(B, 4\)"):
        model.dequeue_and_enqueue(torch.randn(3, DIM + 1))


def test_training_forward_enqueues_and_eval_changes_nothing() -> None:
    model = make()
    out = model(torch.randn(N, IN), torch.randn(N, IN))
    assert int(model.queue_ptr) == N
    torch.testing.assert_close(model.queue[:, :N], out["k"].t())
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(N, IN), torch.randn(N, IN))
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


def test_embed_uses_momentum_encoder_in_eval_mode() -> None:
    model = make(momentum=0.0)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    x = torch.randn(N, IN)
    emb_k = model.embed(x)
    emb_q = model.embed(x, momentum=False)
    assert emb_k.shape == (N, DIM) and not emb_k.requires_grad
    torch.testing.assert_close(emb_k.norm(dim=1), torch.ones(N))
    assert not torch.allclose(emb_k, emb_q)
    model.encoder_k.eval()
    torch.testing.assert_close(emb_k, F.normalize(model.encoder_k(x), dim=1))
    model.train()
    model.embed(x)
    assert model.encoder_k.training  # mode restored


def test_state_dict_round_trip() -> None:
    model = make()
    model(torch.randn(N, IN), torch.randn(N, IN))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = make()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(clone.queue, model.queue) and int(clone.queue_ptr) == N


def test_bad_construction_and_backbone_output() -> None:
    with pytest.raises(ValueError, match="queue_size must be an int >= 1"):
        MoCo(FeatureNet(), FEAT, queue_size=0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        MoCo(FeatureNet(), FEAT, momentum=1.5)
    with pytest.raises(TypeError, match=r"backbone must be an nn\.Module"):
        MoCo("resnet", FEAT)  # type: ignore[arg-type]
    model = MoCo(FeatureNet(), FEAT + 1, dim=DIM, queue_size=K)
    with pytest.raises(ValueError, match=r"backbone features must have shape \(N, 9\)"):
        model(torch.randn(N, IN), torch.randn(N, IN))
