# The Debian packages dmzctl needs, in one place: sourced by scripts/setup.sh (a clone that runs the
# tests: both lists) and scripts/install.sh (a host that runs dmzctl: HOST_PACKAGES only).
# Add a package where it belongs; nothing else lists them.

# What dmzctl itself runs on: libvirt and QEMU, nftables, the Python bindings Debian's python3 sees
# (the venvs are made with --system-site-packages), dnsmasq for the DMZ's DHCP/DNS, ip(8) for verify's
# namespaces, and Graphviz for `dmzctl diagram` and `report`.
HOST_PACKAGES=(
  libvirt-daemon-system qemu-system-x86 qemu-utils nftables python3-nftables
  python3-libvirt python3-lxml python3-venv dnsmasq-base iproute2 iptables
  graphviz fonts-dejavu-core
)

# What the tests and the demo need on top.
TEST_PACKAGES=(
  libxml2-utils busybox-static iperf3 iputils-ping socat procps systemd conntrack
  # the graphical console through the real viewers, on a virtual X server (tests/test_console.py)
  virt-viewer virt-manager gir1.2-spiceclientgtk-3.0 gir1.2-spiceclientglib-2.0 xvfb xdotool imagemagick
  # the realistic Debian guest and its cloud-init seed (scripts/build-debian-guest.sh, tests/test_debian_guest.py)
  debootstrap xorriso openssh-client
  # the report seen in a real headless browser (tests/test_report.py)
  chromium chromium-driver
  # the usual way, measured against dmzctl up (scripts/bench_provision.py): virt-install
  virtinst
)

# install_packages PKG...: apt-get install those not installed yet (as root); says which.
install_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "${0##*/}: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}
