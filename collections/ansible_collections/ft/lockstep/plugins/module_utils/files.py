# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small file helpers the host modules share."""


def read_text(path, missing=None):
    """The file's text, or missing when it cannot be read (absent, unreadable)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return missing
