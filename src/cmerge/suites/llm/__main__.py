"""``python -m cmerge.suites.llm``: the same command as ``cmerge bench llm``."""
from cmerge.suites.llm.commands import llm_command

if __name__ == "__main__":
    llm_command()
