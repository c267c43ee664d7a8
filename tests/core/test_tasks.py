"""The demo tasks: seeded data, disjoint held-out values, program checks, engine evaluation."""

from edgepeft.tasks import TASKS


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
