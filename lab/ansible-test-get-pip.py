# ansible-test creates its sanity venvs without pip and downloads a pip bootstrap script from
# ci-files.testing.ansible.com, which these machines cannot resolve. lab/install puts this file
# where ansible-test looks for that download (its error message names the path): it installs
# the pip that ships with this Python instead. The requirements then come from the package index.
import ensurepip
import sys

sys.exit(ensurepip._main(["--upgrade", "--default-pip"]))
