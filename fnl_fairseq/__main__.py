"""``python -m fnl_fairseq``: print the path to pass to fairseq's ``--user-dir``."""
from fnl_fairseq import user_dir

if __name__ == "__main__":
    print(user_dir())
