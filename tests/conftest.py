import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_data_root(tmp_path, monkeypatch):
    """No test reads or writes the user's data root or downloads from the real host."""
    monkeypatch.setenv("OPTSTATE_DATA", str(tmp_path / "data-root"))
    monkeypatch.delenv("OPTSTATE_MIRROR", raising=False)
