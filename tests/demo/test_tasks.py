"""The demo tasks: seeded data, disjoint held-out values, program checks, engine evaluation."""

from edgepeft.demo.tasks import TASKS


class StubEngine:
    """Answers from a table; records how it was called."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompt, adapter=None, max_new_tokens=0, chat=False):
        self.calls.append((adapter, max_new_tokens, chat))
        return self.answers.get(prompt, "")


def test_evaluate_scores_held_out_answers_with_the_task_check():
    for task in TASKS.values():
        held = task.examples(8, held_out=True, seed=0)
        perfect = StubEngine({e.prompt: e.target for e in held})
        assert task.evaluate(perfect, "a", 8) == 1.0
        assert set(perfect.calls) == {("a", task.max_new_tokens, True)}
        assert task.evaluate(StubEngine({}), None, 8) == 0.0


def test_examples_are_seeded_and_held_out_values_never_train():
    json_task = TASKS["json"]
    assert json_task.examples(5, False, seed=3) == json_task.examples(5, False, seed=3)
    train_names = {e.target.split('"name": "')[1].split('"')[0] for e in json_task.examples(400, False)}
    held_names = {e.target.split('"name": "')[1].split('"')[0] for e in json_task.examples(400, True)}
    assert train_names and held_names and not train_names & held_names


def test_held_out_prompts_are_distinct_and_a_shorter_list_is_a_prefix():
    from edgepeft.demo.tasks import TASK_PROMPTS

    for task in TASKS.values():
        held = task.examples(TASK_PROMPTS, held_out=True)
        assert len({e.prompt for e in held}) == TASK_PROMPTS, task.name
        assert task.examples(40, held_out=True) == held[:40]
        train = {e.prompt for e in task.examples(2000, held_out=False)}
        assert not train & {e.prompt for e in held}, task.name


def test_task_check_tells_a_one_sided_loss_from_noise():
    from edgepeft.demo.tasks import compare_to_reference

    ref = "1" * 90 + "0" * 30  # PyTorch right on 90 of 120
    same = [c == "1" for c in ref]
    assert compare_to_reference(ref, same)["ok"]
    # lose 3, gain 1: chance (p = 0.31)
    noisy = list(same)
    noisy[0] = noisy[1] = noisy[2] = False
    noisy[100] = True
    c = compare_to_reference(ref, noisy)
    assert (c["lost"], c["gained"], c["ok"]) == (3, 1, True) and abs(c["p"] - 5 / 16) < 1e-12
    # lose 5, gain none: beyond chance (p = 1/32), although only 4 points
    lossy = [False] * 5 + same[5:]
    assert not compare_to_reference(ref, lossy)["ok"]
    # lose 12, gain 5: p = 0.07 passes the sign test, but 7 net of 120 is over the 5% margin
    wide = [False] * 12 + same[12:90] + [True] * 5 + same[95:]
    c = compare_to_reference(ref, wide)
    assert c["p"] > 0.05 and not c["ok"]
    # block size 128 on the json adapter: 7.5% of prompts against PyTorch's 77.5%
    assert not compare_to_reference("1" * 93 + "0" * 27, [True] * 9 + [False] * 111)["ok"]
    # only the first len(got) of PyTorch's outcomes are paired; more than it has is refused
    assert compare_to_reference(ref, same[:40])["prompts"] == 40
    import pytest

    with pytest.raises(ValueError, match="cover 120"):
        compare_to_reference(ref, same + [True])


def test_shipped_metrics_hold_pytorchs_outcome_on_every_check_prompt():
    from edgepeft.demo.shipped import shipped_adapters, shipped_metrics
    from edgepeft.demo.tasks import TASK_PROMPTS

    metrics = shipped_metrics()
    for name in shipped_adapters():
        m = metrics[name]
        assert m["held_out"] == TASK_PROMPTS == len(m["pytorch_correct"]) and set(m["pytorch_correct"]) <= {"0", "1"}
        assert abs(m["pytorch_correct"].count("1") / TASK_PROMPTS - m["pytorch_accuracy"]) < 1e-9
