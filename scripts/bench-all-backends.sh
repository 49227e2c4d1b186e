#!/bin/bash
# Runs the lifecycle and scale scenarios on each backend, each on a pool it makes (as root):
# image on the host filesystem, image on an xfs pool image, btrfs and dir on loop-mounted
# filesystems. Figures in docs/benchmarks.md come from this script.
S=${STRATA:-./target/release/strata}
B=${BENCH_DIR:-/tmp/strata-bench-all}
rm -rf $B; mkdir -p $B
truncate -s 8G $B/btrfs.img && mkfs.btrfs -q $B/btrfs.img >/dev/null 2>&1 && mkdir $B/btrfs && mount -o loop $B/btrfs.img $B/btrfs
truncate -s 8G $B/ext4.img && mkfs.ext4 -qF $B/ext4.img && mkdir $B/ext4 && mount -o loop $B/ext4.img $B/ext4
run() { # name, serve args...
  name=$1; shift
  $S serve --endpoint unix://$B/$name.sock --node-id n --log-level warn "$@" > $B/$name.log 2>&1 &
  sleep 1
  PID=$(pgrep -f "unix://$B/$name.sock" | head -1)
  echo "=== $name idle RSS $(grep VmRSS /proc/$PID/status | awk '{print $2}') kB"
  $S bench lifecycle --endpoint unix://$B/$name.sock --volumes 200 --concurrency 4 --size 64Mi --data 1Mi --workdir $B/w-$name -o json > $B/$name.lifecycle.json
  python3 -c "import json;r=json.load(open('$B/$name.lifecycle.json'));print('lifecycle vol/s %.1f'%r['volumes_per_second'], ' '.join('%s=%.2f'%(x['rpc'],x['p50_ms']) for x in r['rpcs']))"
  echo "loaded RSS $(grep VmRSS /proc/$PID/status | awk '{print $2}') kB"
  for n in 10 100 1000 10000; do
    $S bench scale --endpoint unix://$B/$name.sock --volumes $n --concurrency 1 --page-size 500 -o json > $B/$name.scale$n.json
    python3 -c "import json;r=json.load(open('$B/$name.scale$n.json'));d={x['rpc']:x for x in r['rpcs']};print('scale $n create p50 %.3f delete p50 %.3f list-all %.1f ms'%(d['CreateVolume']['p50_ms'],d['DeleteVolume']['p50_ms'],d['ListVolumes (all pages)']['p50_ms']))"
  done
  kill $PID; sleep 1
}
run image-ext4 --pool $B/image-ext4
run image-reflink --pool $B/image-reflink --pool-image 16Gi
run btrfs --pool $B/btrfs/pool --backend btrfs
run dir --pool $B/ext4/pool --backend dir
umount $B/image-reflink/data 2>/dev/null
sleep 1
umount $B/btrfs $B/ext4
losetup -a
