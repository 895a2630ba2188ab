// Command pstest serves Google's in-memory Pub/Sub fake (cloud.google.com/go/pubsub/v2/pstest)
// for the gateway's tests. It listens on 127.0.0.1 only, prints "ADDR 127.0.0.1:<port>" on
// stdout once it accepts connections, and runs until SIGTERM or SIGINT. State is in memory:
// a restart starts empty.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cloud.google.com/go/pubsub/v2/pstest"
)

func main() {
	port := flag.Int("port", 0, "loopback port to listen on (0 = any free port)")
	flag.Parse()

	srv := pstest.NewServerWithAddress(fmt.Sprintf("127.0.0.1:%d", *port))
	fmt.Printf("ADDR %s\n", srv.Addr)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	srv.Close()
}
