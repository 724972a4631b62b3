"""docs/keras.md's options table is the constructor's: every option, every default."""

from kron.keras import Kron


def test_options_table_matches_the_signature(check_options_table):
    check_options_table("keras.md", Kron)
