"""``python -m benchmarks.main_job``: runs the main job (see ``job``)."""

from .job import main

if __name__ == '__main__':
    main()
