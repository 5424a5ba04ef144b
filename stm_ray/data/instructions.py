"""Query instructions of the tasks: the built-in tasks' own, and the generic one every other task gets.

A task's instruction is part of its data (what its queries ask for): Synthesize writes it into every shard row,
training prepends it, and the instruction search starts from it.
"""

from __future__ import annotations

# Query instructions for the built-in tasks; other tasks get the generic one (or model.query_instruction).
DEFAULT_INSTRUCTIONS = {
    "icd10": "Given a diagnosis or condition name, retrieve the ICD-10-CM code that covers it",
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
}
GENERIC_INSTRUCTION = "Given a query, retrieve the passages that answer it"


def task_instruction(task_spec: str, task_name: str, configured: str | None) -> str:
    """The instruction a task's rows are made with: the configured query instruction, else a built-in one."""
    if configured:
        return configured.strip().removeprefix("Instruct:").split("\n")[0].strip()
    # a docs: task over a known corpus asks what that corpus's queries ask
    task_spec, task_name = task_spec.removeprefix("docs:"), task_name.removeprefix("docs:")
    for key in (task_spec, task_name, task_name.split(":")[0]):
        if key in DEFAULT_INSTRUCTIONS:
            return DEFAULT_INSTRUCTIONS[key]
    if "scifact" in task_name.lower():
        return DEFAULT_INSTRUCTIONS["scifact"]
    return GENERIC_INSTRUCTION
