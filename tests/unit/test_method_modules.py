"""The small trainable pieces of TGMB and CMCD: translator, critic, projection head and embedding queue."""

from __future__ import annotations

import pytest
import torch

from xkt.client.methods.projection import EmbeddingQueue, ProjectionHead
from xkt.client.methods.translator import ModalityDiscriminator, Translator
from xkt.shared.data import IMAGENET_MEAN, IMAGENET_STD


def _loader_batch(unit: torch.Tensor) -> torch.Tensor:
    """What the site loader makes of a (B, 1, H, W) [0, 1] image: repeated to 3 channels, ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (unit.expand(-1, 3, -1, -1) - mean) / std


def test_translator_recovers_the_single_channel_and_keeps_the_shape() -> None:
    torch.manual_seed(0)
    translator = Translator(IMAGENET_MEAN, IMAGENET_STD, channels=8)
    unit = torch.rand(4, 1, 10, 12)
    images = _loader_batch(unit)
    assert torch.allclose(translator.unit_image(images), unit, atol=1e-6)
    assert translator(images).shape == (4, 3, 10, 12)


def test_translator_output_depends_on_its_input() -> None:
    torch.manual_seed(0)
    translator = Translator(IMAGENET_MEAN, IMAGENET_STD).eval()  # eval: no batch coupling through BN
    first = _loader_batch(torch.rand(2, 1, 8, 8))
    second = first.clone()
    second[1, :, 4, 4] += 1.0  # one pixel of the second image
    out_first, out_second = translator(first), translator(second)
    assert torch.equal(out_first[0], out_second[0])  # eval mode: other images are unaffected
    assert not torch.equal(out_first[1], out_second[1])
    assert torch.equal(out_first[1, :, 0, 0], out_second[1, :, 0, 0])  # 3×3 receptive field: far pixels unchanged


def test_translator_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    translator = Translator(IMAGENET_MEAN, IMAGENET_STD, channels=4)
    translator(_loader_batch(torch.rand(3, 1, 6, 6))).pow(2).mean().backward()
    for name, parameter in translator.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_translator_initialisation_follows_the_callers_seed_and_saves_no_constants() -> None:
    torch.manual_seed(3)
    first = Translator(IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(3)
    second = Translator(IMAGENET_MEAN, IMAGENET_STD)
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    assert "mean" not in first.state_dict() and "std" not in first.state_dict()
    with pytest.raises(ValueError):
        Translator((0.5,), (0.5,))


@pytest.mark.parametrize("size", [1, 7, 32])
def test_discriminator_gives_one_logit_per_image(size: int) -> None:
    torch.manual_seed(0)
    critic = ModalityDiscriminator(width=8)
    logits = critic(torch.randn(5, 3, size, size))
    assert logits.shape == (5,)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in critic.parameters())


def test_discriminator_scores_each_image_independently_of_its_batch() -> None:
    torch.manual_seed(0)
    critic = ModalityDiscriminator(width=8)
    images = torch.randn(4, 3, 16, 16)
    assert torch.allclose(critic(images)[:2], critic(images[:2]), atol=1e-6)


def test_projection_head_gives_unit_rows() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(16, out_dim=8)
    out = head(torch.randn(6, 16))
    assert out.shape == (6, 8)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-6)
    assert head.mlp[0].out_features == 16  # hidden width defaults to the input width
    assert ProjectionHead(16, hidden_dim=4).mlp[0].out_features == 4
    assert ProjectionHead(16)(torch.randn(2, 16)).shape == (2, 128)


def _rows(*angles: float) -> torch.Tensor:
    """Distinct unit rows (cos θ_k, sin θ_k), one per angle θ_k, so FIFO order is visible."""
    theta = torch.tensor(angles)
    return torch.stack([theta.cos(), theta.sin()], dim=1)


def test_queue_is_first_in_first_out_and_wraps_around() -> None:
    queue = EmbeddingQueue(size=3, dim=2)
    assert len(queue) == 0 and queue.tensor().shape == (0, 2)
    queue.push(_rows(0.1, 0.2))
    assert torch.allclose(queue.tensor(), _rows(0.1, 0.2))
    queue.push(_rows(0.3, 0.4))  # 0.1 drops out, the write wraps to row 0
    assert len(queue) == 3
    assert torch.allclose(queue.tensor(), _rows(0.2, 0.3, 0.4))
    queue.push(_rows(0.5))
    assert torch.allclose(queue.tensor(), _rows(0.3, 0.4, 0.5))


def test_queue_caps_a_large_batch_at_its_size() -> None:
    queue = EmbeddingQueue(size=2, dim=2)
    queue.push(_rows(0.1))
    queue.push(_rows(0.2, 0.3, 0.4, 0.5))
    assert len(queue) == 2
    assert torch.allclose(queue.tensor(), _rows(0.4, 0.5))


def test_queue_stores_detached_normalised_copies() -> None:
    queue = EmbeddingQueue(size=4, dim=2)
    embeddings = torch.tensor([[3.0, 4.0]], requires_grad=True)
    queue.push(embeddings)
    stored = queue.tensor()
    assert not stored.requires_grad
    assert torch.allclose(stored, torch.tensor([[0.6, 0.8]]))
    queue.push(_rows(0.0))
    assert torch.allclose(stored, torch.tensor([[0.6, 0.8]]))  # a returned tensor never changes afterwards
