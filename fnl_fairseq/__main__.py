"""``python -m fnl_fairseq``: print the path to pass to fairseq's ``--user-dir``."""
from fnl_fairseq import require_fairseq, user_dir

if __name__ == "__main__":
    require_fairseq("python -m fnl_fairseq")
    print(user_dir())
