# Copyright: ft developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
name: ft_vms
short_description: The FT VMs (pairs) lockstepd knows, with their state and hosts
version_added: "0.1.0"
description:
  - One inventory host per FT VM (the VM's name), with the pair's state, reason, primary and
    secondary host, mode and generation as host variables, in groups by state, by alarm and by
    the FT hosts that run its primary and secondary.
  - The plugin asks lockstepd over SSH, the way Ansible already reaches the FT hosts. It logs in
    to one of O(hosts) and runs C(ftctl status --json) there. ftctl is the engine's own client of
    the root-only local socket. Any host's lockstepd answers for every pair, because the pair
    records are on the shared datastore. The hosts are tried in order until one answers. A host
    that is down is the normal case in FT, so the hosts that did not answer before it are warnings.
    Only when no host answers does the inventory fail, naming every host and why.
    ansible-inventory and ansible-playbook treat that failure as a warning, as they do for any
    source that fails, unless C(ANSIBLE_INVENTORY_UNPARSED_FAILED) is true. AWX sets it for
    inventory syncs.
  - "Why SSH and not the daemons' peer API: the peer API listens only on the FT-logging network,
    which is usually a private link between the hosts that the controller cannot reach. Its secret
    is the cluster's key, and it can stop and kill VMs (C(/peer/kill)), far more than an inventory
    needs. SSH uses the access and keys that the operator already manages for playbooks
    (C(BatchMode), host keys checked as the SSH configuration says). It opens no new port and
    spreads no secret. On the host it needs root for the socket: log in as root or set O(become)."
  - "Host variables, from lockstepd's view of the pair: C(ft_state), C(ft_reason), C(ft_primary),
    C(ft_secondary) (null while there is none), C(ft_mode), C(ft_generation), C(ft_checkpoint_ms),
    C(ft_alarm) (green, yellow or red), C(ft_preferred_secondary), C(ft_guest) (name, MAC, memory,
    vCPUs, boot files), C(ft_stats) (lockstep statistics, when the answering host drives the pair),
    C(ft_answered_by) (the entry of O(hosts) that answered) and C(ft_engine_host) (its lockstepd's
    host name)."
  - "Groups: C(ft_vms) (every FT VM), C(ft_state_<state>) (for example C(ft_state_running),
    C(ft_state_need_secondary), C(ft_state_disabled)), C(ft_alarm_<level>), C(ft_primary_<host>) and
    C(ft_secondary_<host>), with the engine's host names. Characters not allowed in a group name
    become C(_), for example C(ft_primary_kvm_1) for C(kvm-1)."
  - A record that lockstepd cannot read is a warning, and that VM is left out.
  - lockstepd records no guest address, so C(ansible_host) is not set. Set it with O(compose) if
    the VMs are to be managed too.
author:
  - ft developers (@ft-lockstep)
extends_documentation_fragment:
  - ansible.builtin.constructed
  - ansible.builtin.inventory_cache
options:
  plugin:
    description: The name of this plugin; the file must be named C(*.ft_vms.yml) or C(*.ft_vms.yaml).
    type: str
    required: true
    choices: [ft.lockstep.ft_vms]
  hosts:
    description:
      - The FT hosts to ask, as SSH destinations (a name or an address), tried in this order.
      - One answer is enough. Every host's lockstepd answers for every pair.
    type: list
    elements: str
    required: true
  user:
    description: The SSH user (default, the SSH configuration's).
    type: str
    env:
      - name: FT_VMS_SSH_USER
  port:
    description: The SSH port (default, the SSH configuration's).
    type: int
  private_key_file:
    description: The SSH private key (for example a file injected by an AWX credential).
    type: path
    env:
      - name: FT_VMS_SSH_KEY
  known_hosts_file:
    description:
      - A known_hosts file with the FT hosts' keys (for example a file injected by an AWX
        credential). Given, ssh checks the host keys against it only (C(StrictHostKeyChecking=yes)).
    type: path
    env:
      - name: FT_VMS_SSH_KNOWN_HOSTS
  ssh_executable:
    description: The ssh client.
    type: str
    default: ssh
  ssh_args:
    description:
      - More ssh options, for example C([-o, ProxyJump=bastion]).
      - They come after the plugin's own (C(BatchMode), C(ConnectTimeout), the known_hosts options),
        and ssh takes the first value it is given for an option.
    type: list
    elements: str
    default: []
  connect_timeout:
    description: Seconds ssh may take to connect to one host (its C(ConnectTimeout)).
    type: int
    default: 10
  timeout:
    description: Seconds one host may take to answer in all.
    type: int
    default: 60
  become:
    description: Run ftctl through C(sudo -n) (the socket is root's); not needed when O(user) is root.
    type: bool
    default: false
  ftctl:
    description: ftctl on the FT hosts (where the ft_engine role installs it).
    type: str
    default: /opt/lockstep/venv/bin/ftctl
  socket:
    description: lockstepd's socket on the FT hosts (default, ftctl's, C(/run/lockstepd.sock)).
    type: str
requirements:
  - an ssh client on the controller; lockstepd and ftctl on the FT hosts (role C(ft_engine))
seealso:
  - module: ft.lockstep.ft_cluster_info
"""

EXAMPLES = r"""
# inventories/ft/site.ft_vms.yml; then: ansible-inventory -i inventories/ft/site.ft_vms.yml --graph
plugin: ft.lockstep.ft_vms
hosts: [kvm1.example.org, kvm2.example.org, kvm3.example.org]
user: ansible
become: true
# a group of the pairs that are not protected, and one per FT mode
groups:
  ft_unprotected: ft_state != 'running'
keyed_groups:
  - key: ft_mode
    prefix: ft_mode
# the same answer for 5 minutes
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: /var/cache/ansible/ft_vms
cache_timeout: 300
"""

import json
import os
import re
import shlex
import shutil
import subprocess

from ansible.errors import AnsibleParserError
from ansible.inventory.group import to_safe_group_name
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

# what becomes a host variable: ft_<key> from the pair's view (lockstepd's GET /status "pairs")
VIEW_VARS = {
    "state": "ft_state",
    "reason": "ft_reason",
    "primary": "ft_primary",
    "secondary_host": "ft_secondary",
    "mode": "ft_mode",
    "generation": "ft_generation",
    "checkpoint_ms": "ft_checkpoint_ms",
    "alarm": "ft_alarm",
    "preferred_secondary": "ft_preferred_secondary",
    "guest": "ft_guest",
    "stats": "ft_stats",
}
NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "ft.lockstep.ft_vms"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("ft_vms.yml", "ft_vms.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        problems = self._problems()
        if problems:
            raise AnsibleParserError(f"{path}: " + "; ".join(problems))
        key = self.get_cache_key(path)
        use_cache = self.get_option("cache")
        answer = None
        if use_cache and cache:
            answer = self._cache.get(key)
        if answer is None:
            answer = self._ask()
            if use_cache:
                self._cache[key] = answer
        self._populate(answer)

    def _problems(self):
        """Every reason the configuration cannot work, at once."""
        problems = []
        hosts = self.get_option("hosts") or []
        if not hosts:
            problems.append("hosts must list at least one FT host")
        if any(not isinstance(h, str) or not h.strip() or h.startswith("-") for h in hosts):
            problems.append(
                "hosts must be SSH destinations (names or addresses, not empty, not starting with -)"
            )
        if len(set(hosts)) < len(hosts):
            problems.append("hosts lists a host twice")
        port = self.get_option("port")
        if port is not None and not 0 < port < 65536:
            problems.append(f"port must be from 1 to 65535, not {port}")
        for name in ("connect_timeout", "timeout"):
            if self.get_option(name) <= 0:
                problems.append(f"{name} must be a positive number of seconds, not {self.get_option(name)}")
        for name in ("private_key_file", "known_hosts_file"):
            if self.get_option(name) and not os.access(self.get_option(name), os.R_OK):
                problems.append(f"{name} {self.get_option(name)} is not a readable file")
        if shutil.which(self.get_option("ssh_executable")) is None:
            problems.append(f"ssh_executable {self.get_option('ssh_executable')} is not found")
        if not self.get_option("ftctl").startswith("/"):
            problems.append(f"ftctl must be an absolute path on the FT hosts, not {self.get_option('ftctl')}")
        return problems

    def _argv(self, host):
        remote = [self.get_option("ftctl"), "status", "--json"]
        if self.get_option("socket"):
            remote += ["--socket", self.get_option("socket")]
        if self.get_option("become"):
            remote = ["sudo", "-n", "--", *remote]
        argv = [self.get_option("ssh_executable"), "-o", "BatchMode=yes"]
        argv += ["-o", f"ConnectTimeout={self.get_option('connect_timeout')}"]
        if self.get_option("port"):
            argv += ["-p", str(self.get_option("port"))]
        if self.get_option("private_key_file"):
            argv += ["-i", self.get_option("private_key_file")]
        if self.get_option("known_hosts_file"):
            argv += ["-o", f"UserKnownHostsFile={self.get_option('known_hosts_file')}"]
            argv += ["-o", "StrictHostKeyChecking=yes"]
        if self.get_option("user"):
            argv += ["-l", self.get_option("user")]
        return [*argv, *self.get_option("ssh_args"), "--", host, " ".join(map(shlex.quote, remote))]

    def _ask_one(self, host):
        """lockstepd's GET /status through ftctl on host; (answer, None) or (None, why not)."""
        try:
            done = subprocess.run(
                self._argv(host),
                capture_output=True,
                text=True,
                timeout=self.get_option("timeout"),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None, f"no answer within {self.get_option('timeout')} s"
        except OSError as e:
            return None, f"cannot run {self.get_option('ssh_executable')}: {e}"
        # the last line says it (ssh's "Host key verification failed." after its banner of @s)
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        err = lines[-1][:300] if lines else ""
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get("error"):
            return None, f"lockstepd: {answer['error']}"
        if done.returncode == 255:
            return None, f"ssh failed: {err or 'exit 255'}"
        if done.returncode != 0 or not isinstance(answer, dict) or not isinstance(answer.get("pairs"), list):
            return (
                None,
                f"ftctl status exited {done.returncode}: {err or done.stdout.strip()[:200] or 'no output'}",
            )
        return answer, None

    def _ask(self):
        failed = []
        for host in self.get_option("hosts"):
            answer, why = self._ask_one(host)
            if answer is not None:
                for other, reason in failed:
                    self.display.warning(
                        f"ft.lockstep.ft_vms: FT host {other} did not answer ({reason}); {host} did"
                    )
                return {"answered_by": host, "status": answer}
            failed.append((host, why))
        raise AnsibleParserError(
            "ft.lockstep.ft_vms: no FT host answered: " + "; ".join(f"{h}: {why}" for h, why in failed)
        )

    def _populate(self, answer):
        status = answer["status"]
        strict = self.get_option("strict")
        self.inventory.add_group("ft_vms")
        for alarm in status.get("alarms") or []:
            if alarm.get("state") == "unreadable":
                self.display.warning(
                    f"ft.lockstep.ft_vms: the record of {alarm.get('vm')} cannot be read: "
                    f"{alarm.get('reason')}"
                )
        for view in status["pairs"]:
            name = view.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                self.display.warning(f"ft.lockstep.ft_vms: a pair without a valid name is left out: {name!r}")
                continue
            self.inventory.add_host(name, group="ft_vms")
            hostvars = {var: view.get(key) for key, var in VIEW_VARS.items() if key in view}
            hostvars["ft_answered_by"] = answer["answered_by"]
            hostvars["ft_engine_host"] = status.get("host")
            for var, value in hostvars.items():
                self.inventory.set_variable(name, var, value)
            for group, value in (
                ("ft_state", view.get("state")),
                ("ft_alarm", view.get("alarm")),
                ("ft_primary", view.get("primary")),
                ("ft_secondary", view.get("secondary_host")),
            ):
                if value:
                    group = self.inventory.add_group(
                        to_safe_group_name(f"{group}_{value}", force=True, silent=True)
                    )
                    self.inventory.add_child(group, name)
            self._set_composite_vars(self.get_option("compose"), hostvars, name, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, name, strict=strict)
