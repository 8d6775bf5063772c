# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - lockstepd's local API socket on the managed host (its C(socket) setting; the ft_engine role
        puts it at C(/run/lockstepd.sock)). Any FT host's daemon answers for every pair.
    type: path
    default: /run/lockstepd.sock
requirements:
  - lockstepd running on the managed host (role C(ft_engine))
"""
