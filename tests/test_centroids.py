"""CentroidBank: the vectorised update against the per-sample MoPro loop, and across ranks."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import CentroidBank


def reference_update(c, z, y, m):
    """The MoPro loop in float64 numpy: per-sample momentum, then row-wise L2 normalisation."""
    c = np.array(c, dtype=np.float64)
    for z_i, y_i in zip(np.asarray(z, dtype=np.float64), np.asarray(y)):
        c[y_i] = m * c[y_i] + (1 - m) * z_i
    # F.normalize semantics: divide by max(norm, 1e-12), so zero rows stay zero.
    norms = np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c / norms


def random_batch(rng, n, k, d, classes=None):
    z = rng.normal(size=(n, d))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    y = rng.choice(k if classes is None else classes, size=n)
    return z, y


def bank_with(centroids, momentum):
    bank = CentroidBank(*centroids.shape, momentum=momentum)
    bank.centroids.copy_(torch.as_tensor(centroids))
    return bank


@pytest.mark.parametrize("momentum", [0.99, 0.9, 0.5, 0.0])
def test_vectorised_update_equals_per_sample_loop(momentum):
    rng = np.random.default_rng(1)
    k, d = 12, 8
    start = rng.normal(size=(k, d))
    start /= np.linalg.norm(start, axis=1, keepdims=True)
    start[[2, 7]] = 0.0  # classes not seen yet
    bank = bank_with(start.astype(np.float32), momentum)
    c_ref = bank.centroids.double().numpy()
    # 40 samples over 6 classes: many repeats, several classes untouched by the batches.
    for _ in range(3):
        z, y = random_batch(rng, 40, k, d, classes=[0, 2, 3, 5, 9, 11])
        bank.update(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
        c_ref = reference_update(c_ref, z.astype(np.float32), y, momentum)
        np.testing.assert_allclose(bank.centroids.double().numpy(), c_ref, rtol=0, atol=1e-6)
    assert bank.centroids.dtype == torch.float32


def test_long_runs_of_one_class_stay_accurate():
    # 2,000 samples over 3 classes: weights m^(n-j) down to 0.99^700 ~ 1e-3 of the newest.
    rng = np.random.default_rng(6)
    z, y = random_batch(rng, 2000, 3, 16)
    z = z.astype(np.float32)
    bank = CentroidBank(3, 16, momentum=0.99)
    bank.update(torch.tensor(z), torch.tensor(y))
    want = reference_update(np.zeros((3, 16)), z, y, 0.99)
    np.testing.assert_allclose(bank.centroids.double().numpy(), want, rtol=0, atol=1e-6)


def test_hand_computed_update():
    # m = 0.5, class 0 starts at zero and sees z1 = [1, 0] then z2 = [0, 1]:
    #   after z1: 0.5 * [0, 0] + 0.5 * [1, 0] = [0.5, 0]
    #   after z2: 0.5 * [0.5, 0] + 0.5 * [0, 1] = [0.25, 0.5]  ->  normalised [1, 2] / sqrt(5).
    # In the other order the result would be [2, 1] / sqrt(5): batch order matters.
    bank = CentroidBank(3, 2, momentum=0.5)
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    s5 = math.sqrt(5)
    torch.testing.assert_close(bank.centroids,
                               torch.tensor([[1 / s5, 2 / s5], [0.0, 0.0], [0.0, 0.0]]))


def test_unseen_rows_stay_zero_and_seen_rows_are_unit_norm():
    rng = np.random.default_rng(2)
    bank = CentroidBank(10, 5)
    z, y = random_batch(rng, 16, 10, 5, classes=[1, 4, 6])
    bank.update(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    norms = bank.centroids.norm(dim=1)
    seen = torch.zeros(10, dtype=torch.bool)
    seen[[1, 4, 6]] = True
    torch.testing.assert_close(norms[seen], torch.ones(3))
    assert torch.count_nonzero(bank.centroids[~seen]) == 0


def test_update_accepts_bf16_and_graph_tensors_without_tracking_gradients():
    rng = np.random.default_rng(3)
    z, y = random_batch(rng, 8, 4, 6)
    z_leaf = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    bank_a, bank_b = CentroidBank(4, 6, momentum=0.9), CentroidBank(4, 6, momentum=0.9)
    bank_a.update(z_leaf * 1.0, torch.tensor(y, dtype=torch.int32))
    assert not bank_a.centroids.requires_grad and bank_a.centroids.grad_fn is None
    bank_b.update(z_leaf.detach().bfloat16(), torch.tensor(y))
    assert bank_b.centroids.dtype == torch.float32
    torch.testing.assert_close(bank_b.centroids, bank_a.centroids, rtol=0, atol=1e-2)


def test_rejects_mismatched_shapes():
    bank = CentroidBank(4, 6)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        bank.update(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        bank.update(torch.zeros(3, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        bank.update(torch.zeros(2, 6), torch.tensor([1, 4]))


def test_state_dict_round_trip():
    rng = np.random.default_rng(4)
    bank = CentroidBank(5, 3)
    z, y = random_batch(rng, 10, 5, 3)
    bank.update(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    state = bank.state_dict()
    assert list(state) == ["centroids"]
    restored = CentroidBank(5, 3)
    restored.load_state_dict(state)
    assert torch.equal(restored.centroids, bank.centroids)
    assert torch.count_nonzero(restored.centroids) > 0


# --- two processes over gloo ------------------------------------------------------------

def _rank_worker(rank, world_size, init_file, start, z_all, y_all, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        per_rank = z_all.shape[0] // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        bank = bank_with(start, momentum=0.9)
        bank.update(z_all[mine], y_all[mine])
        torch.save(bank.centroids, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_hold_identical_centroids_equal_to_the_concatenated_update(tmp_path):
    rng = np.random.default_rng(5)
    k, d, world_size = 6, 4, 2
    start = rng.normal(size=(k, d))
    start /= np.linalg.norm(start, axis=1, keepdims=True)
    start = torch.tensor(start, dtype=torch.float32)
    z, y = random_batch(rng, 10, k, d)
    z_all, y_all = torch.tensor(z, dtype=torch.float32), torch.tensor(y)

    mp.spawn(_rank_worker, nprocs=world_size,
             args=(world_size, str(tmp_path / "rendezvous"), start, z_all, y_all, str(tmp_path)))

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    assert torch.equal(results[0], results[1])
    single = bank_with(start, momentum=0.9)
    single.update(z_all, y_all)
    torch.testing.assert_close(results[0], single.centroids, rtol=0, atol=1e-7)
    # Rank 0's own half alone would give something else: the gather did happen.
    half = bank_with(start, momentum=0.9)
    half.update(z_all[:5], y_all[:5])
    assert not torch.allclose(results[0], half.centroids, atol=1e-4)
