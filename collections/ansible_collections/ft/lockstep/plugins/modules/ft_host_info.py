#!/usr/bin/python
# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)


DOCUMENTATION = r"""
---
module: ft_host_info
short_description: Can this host's QEMU carry an FT pair - the engine's capability probe
version_added: "0.1.0"
description:
  - Runs lockstepd's C(ftctl probe --json) on the managed host. It starts QEMU with no machine, asks
    QMP for the COLO pieces (migration capability C(x-colo), colo-compare and the network filters,
    the quorum, replication and nbd block drivers), quits, and chooses the accelerator. No VM is started.
  - Fails with a clear message when C(ftctl) is not installed (role C(ft_engine) installs it).
  - Hardware and KVM checks are M(ft.lockstep.vt_host_info)'s.
author:
  - ft developers (@ft-lockstep)
options:
  ftctl:
    description: lockstepd's command line tool; looked up on the PATH and in C(/opt/lockstep/venv/bin).
    type: str
    default: ftctl
  qemu:
    description: The command that runs QEMU (split on spaces), as the engine's C(qemu) setting.
    type: str
    default: qemu-system-x86_64
  accel:
    description: The accelerator to choose, as the engine's C(accel) setting.
    type: str
    choices: [auto, kvm, tcg]
    default: auto
attributes:
  check_mode:
    description: Can run in check mode.
    support: full
    details: This action does not modify state.
  diff_mode:
    description: Returns what changed (or would change in check mode) when run with --diff.
    support: N/A
    details: This action does not modify state.
  idempotent:
    description: When run twice with the same arguments, the second run reports no change.
    support: full
    details: This action does not modify state.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: linux
seealso:
  - module: ft.lockstep.vt_host_info
"""

EXAMPLES = r"""
- name: Can this host's QEMU carry FT pairs?
  ft.lockstep.ft_host_info:
  register: ft_caps

- name: It can
  ansible.builtin.assert:
    that: ft_caps.ready
    fail_msg: "{{ inventory_hostname }}: {{ ft_caps.missing | join('; ') }}"
"""

RETURN = r"""
ready:
  description: Whether the QEMU has everything an FT pair needs (RV(missing) is empty).
  returned: always
  type: bool
missing:
  description: What the QEMU lacks for an FT pair, one reason each.
  returned: always
  type: list
  elements: str
  sample: ["migration capability x-colo is missing"]
qemu_version:
  description: QEMU's version.
  returned: always
  type: str
  sample: 7.2.19
qemu_package:
  description: QEMU's build (the distribution package), so that two builds of one release differ.
  returned: always
  type: str
  sample: Debian 1:7.2+dfsg-7+deb12u18
accel:
  description: The accelerator chosen (kvm or tcg).
  returned: always
  type: str
accel_reason:
  description: Why that accelerator.
  returned: always
  type: str
mode:
  description: The engine's default FT mode on this host (lockstep or checkpoint).
  returned: always
  type: str
engine_version:
  description: The version of the engine (C(ftctl --version)).
  returned: always
  type: str
ftctl:
  description: The C(ftctl) that ran.
  returned: always
  type: str
"""

import json

from ansible.module_utils.basic import AnsibleModule

ENGINE_BIN = "/opt/lockstep/venv/bin"  # role ft_engine's ft_engine_prefix/venv


def main():
    module = AnsibleModule(
        argument_spec=dict(
            ftctl=dict(type="str", default="ftctl"),
            qemu=dict(type="str", default="qemu-system-x86_64"),
            accel=dict(type="str", default="auto", choices=["auto", "kvm", "tcg"]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    ftctl = module.get_bin_path(p["ftctl"], opt_dirs=[ENGINE_BIN])
    if not ftctl:
        module.fail_json(
            msg=f"lockstepd's {p['ftctl']} is not installed on this host (not on the PATH nor in "
            f"{ENGINE_BIN}): install the engine (role ft_engine) or give its path in ftctl"
        )
    rc, out, err = module.run_command([ftctl, "probe", "--json", "--qemu", p["qemu"], "--accel", p["accel"]])
    if rc != 0:
        module.fail_json(msg=f"{ftctl} probe failed (rc {rc}): {(err or out).strip()}", rc=rc, ftctl=ftctl)
    try:
        report = json.loads(out)
    except ValueError:
        module.fail_json(msg=f"{ftctl} probe --json printed no JSON: {out.strip()[:200]}", ftctl=ftctl)
    _rc, version, _err = module.run_command([ftctl, "--version"])
    module.exit_json(
        changed=False,
        ready=not report.get("missing"),
        missing=report.get("missing", []),
        qemu_version=report.get("version"),
        qemu_package=report.get("package"),
        accel=report.get("accel"),
        accel_reason=report.get("accel_reason"),
        mode=report.get("mode"),
        engine_version=version.strip().rpartition(" ")[2] or None,
        ftctl=ftctl,
    )


if __name__ == "__main__":
    main()
