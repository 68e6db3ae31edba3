"""What a model's output means, one module per task. A task has
    check_output(output, labels)         archive time, on the meta device: the head fits the labels
    option_names, parse_options(raw)     per request: validated options (e.g. topk)
    postprocess(outputs, options)        one Tensor row of raw output -> the answer (JSON-serialisable)
    scores(outputs), parity_gap(a, b), PARITY_TOLERANCE
                                         what "answers the same" means when a runtime is compared to eager
Classification is the first; detection or segmentation is one new module registered here.
"""

from handlers.tasks.classification import Classification

TASKS = {task.name: task for task in (Classification,)}


def get_task(name: str, labels: list):
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: this archive needs a newer tvserve ({', '.join(TASKS)} known).")
    return TASKS[name](labels)
