import pytest

from distillkit.errors import LayerMapError
from distillkit.objective.mapping import resolve_layer_map


def test_uniform_spreads_and_ends_at_last_layer():
    assert resolve_layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert resolve_layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]


def test_skip_takes_every_kth_teacher_layer():
    assert resolve_layer_map("skip", 3, 7) == [(1, 2), (2, 4), (3, 6)]


def test_skip_rejects_deeper_student():
    with pytest.raises(LayerMapError, match="no deeper"):
        resolve_layer_map("skip", 4, 2)


def test_last():
    assert resolve_layer_map("last", 2, 6) == [(2, 6)]


def test_explicit_pairs_kept_in_order():
    assert resolve_layer_map([[0, 0], [2, 5]], 2, 6) == [(0, 0), (2, 5)]


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([[3, 1]], "layer 3 is out of range for the student, which has 2 layers"),
        ([[1, 7]], "layer 7 is out of range for the teacher, which has 6 layers"),
        ([[-1, 1]], "out of range for the student"),
    ],
)
def test_explicit_index_out_of_range_names_model_and_depth(pairs, message):
    with pytest.raises(LayerMapError, match=message):
        resolve_layer_map(pairs, 2, 6)


def test_malformed_pair_and_unknown_name():
    with pytest.raises(LayerMapError, match=r"\[student_layer, teacher_layer\]"):
        resolve_layer_map([[1, 2, 3]], 2, 6)
    with pytest.raises(LayerMapError, match="unknown layer map 'unifrom'"):
        resolve_layer_map("unifrom", 2, 6)
    with pytest.raises(LayerMapError, match="at least one"):
        resolve_layer_map([], 2, 6)
