#!/usr/bin/env bash
# On a spot node: wait for EC2's interruption notice (instance metadata, IMDSv2), then tell Ray the node is
# being preempted, with the time left, so Ray Train's workers get it from ray.train.get_preemption_info() and
# the run checkpoints before the node goes (orchestrator/train_loop.py heed_preemption). Started by
# infra/ray/cluster.yaml on gpu_spot_worker nodes; on Kubernetes, a node-termination handler plays this part.
set -u
. ~/tarflow.env 2>/dev/null || true
imds=http://169.254.169.254/latest
while true; do
    token=$(curl -s -X PUT "$imds/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
    action=$(curl -s -f -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/spot/instance-action") && break
    sleep 5
done
# {"action": "terminate", "time": "2026-01-01T00:02:00Z"}: seconds left until then, a few kept as margin
deadline=$(python3 -c 'import json,sys,datetime as d; t=json.loads(sys.argv[1])["time"]; print(max(10, int((d.datetime.fromisoformat(t.replace("Z","+00:00"))-d.datetime.now(d.timezone.utc)).total_seconds())-10))' "$action")
echo "spot interruption notice: $action; draining this Ray node, deadline in ${deadline}s"
ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "EC2 spot interruption: $action" \
    --deadline-remaining-seconds "$deadline"
