"""Which client class a process's n-th user gets: weighted round-robin among the classes below their cap."""

import pytest

from envelope.scenario import ClientRotation, assign_client, pick_client_name


@pytest.mark.parametrize(
    "weights",
    [
        [("a", 3.0), ("b", 1.0)],
        [("a", 1.0), ("b", 1.0), ("c", 1.0)],
        [("x", 0.5), ("y", 2.0), ("z", 1.5)],
    ],
)
def test_without_caps_it_is_pick_client_name(weights):
    classes = [(name, weight, None) for name, weight in weights]
    for n in range(40):
        assert assign_client(classes, n) == pick_client_name(weights, n)


def test_smooth_round_robin_by_hand():
    # 3:1 -> a, a, b, a (then repeats); 1:1:1 -> a, b, c (ties go to the first in order)
    three_one = [("a", 3.0, None), ("b", 1.0, None)]
    assert [assign_client(three_one, n) for n in range(8)] == ["a", "a", "b", "a"] * 2
    even = [("a", 1.0, None), ("b", 1.0, None), ("c", 1.0, None)]
    assert [assign_client(even, n) for n in range(6)] == ["a", "b", "c"] * 2


def test_a_capped_class_fills_then_every_user_goes_to_the_others():
    classes = [("chat", 1.0, None), ("eval", 1.0, 2)]
    got = [assign_client(classes, n) for n in range(8)]
    # chat and eval alternate until eval holds its 2 users, then chat takes all
    assert got == ["chat", "eval", "chat", "eval", "chat", "chat", "chat", "chat"]
    assert got.count("eval") == 2


def test_caps_below_the_round_robin_share():
    # 3:1 with a cap of 1 on a: a, then b for ever
    classes = [("a", 3.0, 1), ("b", 1.0, None)]
    assert [assign_client(classes, n) for n in range(5)] == ["a", "b", "b", "b", "b"]


def test_every_class_full_gives_none():
    classes = [("a", 1.0, 1), ("b", 1.0, 2)]
    got = [assign_client(classes, n) for n in range(6)]
    assert got == ["a", "b", "b", None, None, None]


def test_a_cap_of_zero_never_gets_a_user():
    assert assign_client([("a", 1.0, 0)], 0) is None
    assert [assign_client([("a", 5.0, 0), ("b", 1.0, None)], n) for n in range(3)] == ["b", "b", "b"]


def test_no_classes_gives_none():
    assert assign_client([], 0) is None
    assert assign_client([], 7) is None


@pytest.mark.parametrize("weights", [[("a", 3.0), ("b", 1.0)], [("x", 0.5), ("y", 2.0), ("z", 1.5)], [("only", 1.0)]])
def test_the_kept_rotation_gives_pick_client_names_answer_at_every_position(weights):
    """The open-loop dispatcher keeps one rotation and asks position after position (a trace replay
    skips positions; asking an earlier one starts over): the answers are pick_client_name's."""
    expected = [pick_client_name(weights, n) for n in range(60)]
    rotation = ClientRotation(weights)
    assert [rotation.at(n) for n in range(60)] == expected
    skipping = ClientRotation(weights)
    assert [skipping.at(n) for n in range(1, 60, 3)] == expected[1:60:3]
    assert skipping.at(2) == expected[2] and skipping.at(2) == expected[2]  # back, then the same again
    # the one-class shortcut of assign_client still keeps the cap
    assert assign_client([("only", 1.0, 2)], 1) == "only" and assign_client([("only", 1.0, 2)], 2) is None
