"""The loop benchmark's judge (bench/bench_loop.py): the rules, the tie handling and the same-length control.
No model: these are the pieces that decide every number of its table, so a slip here would bias them all."""
from bench.bench_loop import PREFERENCES, cut_to_same_length, judge, mean_interval, stars_of


def test_rules_count_what_they_name_and_cap_it():
    assert PREFERENCES["list"]("Tips:\n1. Sleep early\n- Read\n* Walk\nno item") == 3
    assert PREFERENCES["numbers"]("Boil 2 eggs for 7 minutes at 100 C, then 1 more") == 3
    assert PREFERENCES["exclaim"]("Great! Really!") == 2
    assert [stars_of(v) for v in (0, 1, 3)] == [2, 4, 5]


def test_judge_counts_a_tie_as_a_half():
    rule = PREFERENCES["exclaim"]
    assert judge(rule, "Yes!", "Yes.") == 1.0 and judge(rule, "Yes.", "Yes!") == 0.0
    assert judge(rule, "Yes.", "No.") == 0.5


def test_same_length_control_removes_a_gain_that_only_length_gives():
    rule = PREFERENCES["exclaim"]
    long = "Drink water often and sleep well every night. Enjoy!"
    short = "Drink water often and sleep well."
    assert judge(rule, long, short) == 1.0                       # the longer answer wins on its extra words only
    assert judge(rule, *cut_to_same_length(long, short)) == 0.5  # cut to six words each: nothing left to prefer
    cut = cut_to_same_length("1. Rest\n2. Walk\n3. Read", "Rest, walk and read")
    assert cut[0] == "1. Rest\n2. Walk" and PREFERENCES["list"](cut[0]) == 2   # line breaks survive the cut


def test_interval_of_a_win_rate():
    m, lo, hi = mean_interval([1.0, 0.5, 0.0, 1.0])
    assert m == 0.625 and 0.0 <= lo < m < hi <= 1.0
    assert mean_interval([1.0] * 8) == (1.0, 1.0, 1.0)
