"""DeepGEMM on this node: its environment checks, its GEMMs checked and timed, and ``check-deepgemm``."""
