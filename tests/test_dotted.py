"""lattice.dotted.import_dotted: the one importer of dotted paths."""
import pytest

from lattice.dotted import import_dotted
from lattice.metrics import binary_auc


def test_imports_the_named_object():
    assert import_dotted("lattice.metrics.binary_auc") is binary_auc


@pytest.mark.parametrize("path, message", [
    ("LatticeNetwork", "network_class must be a dotted path like 'lattice.models.LatticeNetwork', got 'LatticeNetwork'"),
    ("lattice.metrics.", "network_class must be a dotted path"),
    (None, "network_class must be a dotted path"),
    ("lattice.no_such_module.Net", "cannot import network_class 'lattice.no_such_module.Net': No module named"),
    ("lattice.metrics.NoSuchName", "cannot import network_class 'lattice.metrics.NoSuchName': module 'lattice.metrics'"),
])
def test_a_bad_path_names_what_was_asked_for(path, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        import_dotted(path, "network_class")


def test_init_arguments_follow_kwargs_to_the_base_class():
    from lattice.dotted import init_arguments
    from lattice.models import MMoE, LatticeNetwork

    mmoe = init_arguments(MMoE)
    assert {"num_experts", "dim", "head_hidden_dims", "wide", "task_parents"} <= mmoe and "kwargs" not in mmoe
    assert "num_layers" in init_arguments(LatticeNetwork) and "num_layers" not in mmoe

    class Open:
        def __init__(self, a, **kwargs):
            pass

    assert init_arguments(Open) is None
