// Verify the Standard Webhooks signature eventworker sends (Go standard library only).
//
// As a check: WEBHOOK_SECRET=whsec_... WEBHOOK_ID=... WEBHOOK_TIMESTAMP=...
// WEBHOOK_SIGNATURE=... go run verify.go < body   (exit status 0 when valid).
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
)

// Verify reports whether body (exactly as received) was signed with secret.
func Verify(secret, msgID, timestamp, signatureHeader string, body []byte, tolerance time.Duration) bool {
	key := []byte(secret)
	if rest, ok := strings.CutPrefix(secret, "whsec_"); ok {
		decoded, err := base64.StdEncoding.DecodeString(rest)
		if err != nil {
			return false
		}
		key = decoded
	}
	sent, err := strconv.ParseInt(timestamp, 10, 64)
	if err != nil || math.Abs(float64(time.Now().Unix()-sent)) > tolerance.Seconds() {
		return false // too old (or from the future): a replay
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(msgID + "." + timestamp + "."))
	mac.Write(body)
	expected := base64.StdEncoding.EncodeToString(mac.Sum(nil))
	// Several signatures ("v1,<sig> v1,<sig>") may come while a secret is rotated.
	for _, candidate := range strings.Fields(signatureHeader) {
		version, sig, _ := strings.Cut(candidate, ",")
		if version == "v1" && hmac.Equal([]byte(sig), []byte(expected)) {
			return true
		}
	}
	return false
}

func main() {
	body, err := io.ReadAll(os.Stdin)
	if err != nil {
		os.Exit(2)
	}
	env := os.Getenv
	if !Verify(env("WEBHOOK_SECRET"), env("WEBHOOK_ID"), env("WEBHOOK_TIMESTAMP"), env("WEBHOOK_SIGNATURE"), body, 5*time.Minute) {
		os.Exit(1)
	}
}
