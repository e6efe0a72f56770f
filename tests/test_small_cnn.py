"""models.small_cnn: pretraining is reproducible for a seed and a thread count, whatever the global setting."""

import torch

from skmm_pipeline.data.digits import load_digits_transfer
from skmm_pipeline.models.small_cnn import pretrain


def test_pretrain_with_threads_gives_the_same_weights_whatever_the_global_thread_count():
    src = load_digits_transfer().source_train
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = pretrain(src.images[:256], src.labels[:256], 5, epochs=2, threads=2)
        assert torch.get_num_threads() == 1  # restored
        torch.set_num_threads(2)
        b = pretrain(src.images[:256], src.labels[:256], 5, epochs=2)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
