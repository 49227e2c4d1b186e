// Calls Strata the way the kubelet and the CSI sidecars do: grpc-go, dialled over the unix
// socket with a custom dialer (the kubelet passes the socket path as the target, so that
// path goes out as `:authority`; the sidecars pass "unix://PATH"), every call with a
// deadline (a `grpc-timeout` header). Messages are encoded by hand, so grpc-go is the only
// package needed. Prints one JSON object per call: the connection, the call, the status
// code's number, the message's length and its beginning.
//
// Usage: grpc_go SOCKET STAGING_PATH TARGET_PATH
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// raw passes messages through as bytes.
type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (raw) Name() string { return "proto" }

func varint(n uint64) []byte {
	var out []byte
	for n >= 0x80 {
		out = append(out, byte(n)|0x80)
		n >>= 7
	}
	return append(out, byte(n))
}

// field is a length-delimited field (string or message) or, for an integer, a varint.
func field(num uint64, value interface{}) []byte {
	switch v := value.(type) {
	case int:
		return append(varint(num<<3), varint(uint64(v))...)
	case string:
		return field(num, []byte(v))
	case []byte:
		out := append(varint(num<<3|2), varint(uint64(len(v)))...)
		return append(out, v...)
	}
	panic("unknown field type")
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// parse returns the top-level fields of a message: number -> values (ints or bytes).
func parse(buf []byte) map[uint64][]interface{} {
	fields := map[uint64][]interface{}{}
	readVarint := func(i int) (uint64, int) {
		var n uint64
		for shift := 0; ; shift += 7 {
			b := buf[i]
			i++
			n |= uint64(b&0x7f) << shift
			if b&0x80 == 0 {
				return n, i
			}
		}
	}
	for i := 0; i < len(buf); {
		key, next := readVarint(i)
		i = next
		num, wire := key>>3, key&7
		switch wire {
		case 0:
			v, next := readVarint(i)
			fields[num] = append(fields[num], v)
			i = next
		case 2:
			n, next := readVarint(i)
			fields[num] = append(fields[num], buf[next:next+int(n)])
			i = next + int(n)
		default:
			panic(fmt.Sprintf("wire type %d", wire))
		}
	}
	return fields
}

// VolumeCapability { mount { fs_type: "ext4" }, access_mode { mode: SINGLE_NODE_WRITER } }
var ext4 = cat(field(2, field(1, "ext4")), field(3, field(1, 1)))

func createVolume(name string, size int) []byte {
	return cat(field(1, name), field(2, field(1, size)), field(3, ext4))
}

type caller struct {
	conn *grpc.ClientConn
	how  string
}

func (c caller) call(name, method string, request []byte) []byte {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var reply []byte
	err := c.conn.Invoke(ctx, method, &request, &reply, grpc.ForceCodec(raw{}))
	s, _ := status.FromError(err)
	message := s.Message()
	short := message
	if len(short) > 300 {
		short = short[:300]
	}
	line, _ := json.Marshal(map[string]interface{}{
		"dial": c.how, "call": name, "code": int(s.Code()), "length": len(message), "message": short,
	})
	fmt.Println(string(line))
	if err != nil {
		return nil
	}
	return reply
}

// stream makes a server-streaming call as the external-snapshot-metadata sidecar does
// (SnapshotMetadata's two RPCs): one request, messages until the end. Prints the call's
// outcome with the number of messages and of BlockMetadata tuples received.
func (c caller) stream(name, method string, request []byte) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true}
	messages, tuples := 0, 0
	s, err := c.conn.NewStream(ctx, desc, method, grpc.ForceCodec(raw{}))
	if err == nil {
		err = s.SendMsg(&request)
	}
	if err == nil {
		err = s.CloseSend()
	}
	for err == nil {
		var reply []byte
		if err = s.RecvMsg(&reply); err == nil {
			messages++
			tuples += len(parse(reply)[3])
		}
	}
	if err == io.EOF {
		err = nil
	}
	st, _ := status.FromError(err)
	line, _ := json.Marshal(map[string]interface{}{
		"dial": c.how, "call": name, "code": int(st.Code()), "length": len(st.Message()),
		"message": st.Message(), "messages": messages, "tuples": tuples,
	})
	fmt.Println(string(line))
}

// syncfs flushes the filesystem holding path, so a snapshot taken next holds what was
// written.
func syncfs(path string) {
	f, err := os.Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open", path, err)
		os.Exit(1)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		fmt.Fprintln(os.Stderr, "sync", path, err)
		os.Exit(1)
	}
}

func dial(target string) *grpc.ClientConn {
	unix := func(ctx context.Context, addr string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", strings.TrimPrefix(addr, "unix://"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, target, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(unix))
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial", target, err)
		os.Exit(1)
	}
	return conn
}

func main() {
	socket, staging, target := os.Args[1], os.Args[2], os.Args[3]
	// The sidecars' way: "unix://PATH".
	sidecar := caller{dial("unix://" + socket), "sidecar"}
	sidecar.call("GetPluginInfo", "/csi.v1.Identity/GetPluginInfo", nil)
	sidecar.call("Probe", "/csi.v1.Identity/Probe", nil)
	reply := sidecar.call("CreateVolume", "/csi.v1.Controller/CreateVolume", createVolume("go-vol", 32<<20))
	sidecar.call("CreateVolume with a 100 KiB name", "/csi.v1.Controller/CreateVolume",
		createVolume(strings.Repeat("n", 100*1024), 32<<20))
	sidecar.call("DeleteVolume without an id", "/csi.v1.Controller/DeleteVolume", nil)
	if reply == nil {
		return
	}
	volumeID := parse(parse(reply)[1][0].([]byte))[2][0].([]byte)

	// The kubelet's way: the socket path itself as the target.
	kubelet := caller{dial(socket), "kubelet"}
	kubelet.call("NodeGetInfo", "/csi.v1.Node/NodeGetInfo", nil)
	kubelet.call("NodeGetCapabilities", "/csi.v1.Node/NodeGetCapabilities", nil)
	kubelet.call("NodeStageVolume", "/csi.v1.Node/NodeStageVolume",
		cat(field(1, volumeID), field(3, staging), field(4, ext4)))
	kubelet.call("NodePublishVolume", "/csi.v1.Node/NodePublishVolume",
		cat(field(1, volumeID), field(3, staging), field(4, target), field(5, ext4)))
	if err := os.WriteFile(target+"/from-go", []byte("written by the workload"), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "write through the published path:", err)
		os.Exit(1)
	}
	kubelet.call("NodeGetVolumeStats", "/csi.v1.Node/NodeGetVolumeStats",
		cat(field(1, volumeID), field(2, target)))
	// Changed block tracking as the external-snapshot-metadata sidecar asks for it: two
	// snapshots, the allocated ranges of the second one page by page (max_results 1), and the
	// delta between them.
	first := sidecar.call("CreateSnapshot", "/csi.v1.Controller/CreateSnapshot",
		cat(field(1, volumeID), field(2, "go-snap-1")))
	if err := os.WriteFile(target+"/more-from-go", []byte(strings.Repeat("x", 1<<20)), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "write through the published path:", err)
		os.Exit(1)
	}
	syncfs(target)
	second := sidecar.call("CreateSnapshot", "/csi.v1.Controller/CreateSnapshot",
		cat(field(1, volumeID), field(2, "go-snap-2")))
	if first != nil && second != nil {
		snapshotID := func(reply []byte) []byte { return parse(parse(reply)[1][0].([]byte))[2][0].([]byte) }
		one, two := snapshotID(first), snapshotID(second)
		sidecar.stream("GetMetadataAllocated", "/csi.v1.SnapshotMetadata/GetMetadataAllocated",
			cat(field(1, two), field(3, 1)))
		sidecar.stream("GetMetadataDelta", "/csi.v1.SnapshotMetadata/GetMetadataDelta",
			cat(field(1, one), field(2, two)))
		sidecar.stream("GetMetadataDelta without a base", "/csi.v1.SnapshotMetadata/GetMetadataDelta",
			field(2, two))
		sidecar.call("DeleteSnapshot 1", "/csi.v1.Controller/DeleteSnapshot", field(1, one))
		sidecar.call("DeleteSnapshot 2", "/csi.v1.Controller/DeleteSnapshot", field(1, two))
	}
	kubelet.call("NodeUnpublishVolume", "/csi.v1.Node/NodeUnpublishVolume",
		cat(field(1, volumeID), field(2, target)))
	kubelet.call("NodeUnstageVolume", "/csi.v1.Node/NodeUnstageVolume",
		cat(field(1, volumeID), field(2, staging)))
	sidecar.call("DeleteVolume", "/csi.v1.Controller/DeleteVolume", field(1, volumeID))
}
